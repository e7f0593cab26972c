"""Wrappers that reweight any registered pair loss: WPO and LCPO.

"wpo" / "lcpo" use base="dpo" unless the `base` hparam says otherwise; other hyperparameters go
to the base loss. Prefer the bound names "wpo(simpo)", "lcpo(ipo)" (core.with_base): their
needs_ref, hparams and state follow the base, where the plain names declare needs_ref=True and
list dpo's hparams.
"""
import dataclasses

import jax
import jax.numpy as jnp

from dpo_jax.losses import core
from dpo_jax.losses.core import PairLogps, get, register, swap_pair, token_mask

WPO_KEYS = ("policy_chosen_logsumsq", "policy_rejected_logsumsq")


def _base(base: str) -> core.LossSpec:
  spec = get(base)
  if spec.unpaired:
    raise ValueError(f"{base!r} is unpaired; this wrapper needs a pair loss")
  return spec


def _mean_log_weight(tokens, logsumsq, length):
  """mean_t [log p_t − log Σ_v p_v²] over the valid completion tokens."""
  mask = token_mask(tokens, length)
  total = jnp.sum(jnp.where(mask, tokens - logsumsq, 0.0), axis=1)
  return total / core.lengths(length)


@register("wpo", token_stats=("logsumsq",), needs_tokens=True, extra_keys=WPO_KEYS)
def wpo(logps: PairLogps, *, base: str = "dpo", clamp: bool = False, **hparams):
  """WPO (Zhou et al., 2024, arXiv 2406.11827, Eq. 2): base loss × sg(w(y_w)·w(y_l)).

  w(y) = exp(mean_t[log p_t − log Σ_v p_v²]) from the policy's own per-token log-probs
  (policy_*_tokens) and logps.extra["policy_{chosen,rejected}_logsumsq"] [B, T] = log Σ_v p_v²
  = lse(2z) − 2·lse(z) per position (zero-padded like the tokens). clamp=False matches TRL main
  use_weighting=True (no clamp); clamp=True caps the product at 1 as TRL 0.19 did. The log-weight
  is also capped at 50 so the product stays finite. λ = base λ × weight.
  """
  loss, metrics = _base(base)(logps, **hparams)
  log_w = jax.lax.stop_gradient(
      _mean_log_weight(logps.policy_chosen_tokens, logps.extra[WPO_KEYS[0]], logps.chosen_len)
      + _mean_log_weight(logps.policy_rejected_tokens, logps.extra[WPO_KEYS[1]],
                         logps.rejected_len))
  weight = jnp.exp(jnp.minimum(log_w, 0.0 if clamp else 50.0))
  metrics = dict(metrics)
  metrics["lambda"] = metrics["lambda"] * weight
  metrics["wpo/weight"] = weight
  return loss * weight, metrics


def _beta(spec: core.LossSpec, hparams: dict):
  return hparams.get("beta", spec.hparams.get("beta", 1.0))


@register("lcpo", init_state=lambda: {"eta": jnp.asarray(0.9, jnp.float32)},
          update_state=lambda state, metrics: {"eta": jnp.asarray(metrics["eta_next"],
                                                                  jnp.float32)})
def lcpo(logps: PairLogps, *, base: str = "dpo", eta: float = 0.9, eta_momentum: float = 0.9,
         prob: str = "gibbs", **hparams):
  """LCPO / RE-PO (Cao et al., 2025, arXiv 2509.24159): EM reweighting against label noise.

  E-step: the model's probability that the recorded label is right, from the base loss L,
  p_i = e^{−L(w,l)} / (e^{−L(w,l)} + e^{−L(l,w)}) = σ(L(l,w) − L(w,l)) (prob="gibbs", the
  paper's Gibbs link; = exp(−L) for DPO), or p_i = exp(−L(w,l)) clipped to ≤ 1 (prob="exp",
  LOSSES.md's literal form). Posterior w_i = ηp_i / (ηp_i + (1−η)(1−p_i)), computed as
  σ(logit η + logit p_i), no gradient. M-step: loss w_i·L(w,l) + (1−w_i)·L(l,w); η (the annotator
  reliability, loss state) ← eta_momentum·η + (1−eta_momentum)·mean(w), returned as
  metrics["eta_next"]. Reconstructed from the paper's abstract and summaries (its full text was not
  available to us): η₀ = 0.9 and momentum 0.9 are our defaults. Stateful bases are not supported.
  λ = ½(|∂L/∂S_θ(y_w)| + |∂L/∂S_θ(y_l)|)/β of the reweighted loss.
  """
  spec = _base(base)
  if spec.init_state():
    raise ValueError(f"lcpo does not support the stateful base loss {base!r}")
  loss_wl, metrics = spec(logps, **hparams)
  loss_lw, _ = spec(swap_pair(logps), **hparams)
  l_wl, l_lw = jax.lax.stop_gradient(loss_wl), jax.lax.stop_gradient(loss_lw)
  if prob == "gibbs":
    logit_p = l_lw - l_wl
  elif prob == "exp":
    nll = jnp.maximum(l_wl, 0.0)
    logit_p = -nll - core.log1mexp(-nll)
  else:
    raise ValueError(f"prob must be 'gibbs' or 'exp', got {prob!r}")
  w = jax.nn.sigmoid(jnp.log(eta) - jnp.log1p(-eta) + logit_p)

  def loss_fn(pc, pr):
    lp = logps._replace(policy_chosen=pc, policy_rejected=pr)
    return w * spec(lp, **hparams)[0] + (1 - w) * spec(swap_pair(lp), **hparams)[0]

  beta = _beta(spec, hparams)
  metrics = dict(metrics)
  metrics["lambda"] = core.grad_weight(
      loss_fn, (logps.policy_chosen, logps.policy_rejected), (1 / beta, 1 / beta))
  metrics["lcpo/confidence"] = w
  metrics["eta_next"] = eta_momentum * eta + (1 - eta_momentum) * core.weighted_mean(
      w, core.row_weights(logps))
  return w * loss_wl + (1 - w) * loss_lw, metrics


def wpo_spec(base: str) -> core.LossSpec:
  """WPO over `base` (= get(f"wpo({base})")), inheriting its needs_ref, hparams and state."""
  return core.get(f"wpo({base})")


def lcpo_spec(base: str, eta0: float = 0.9) -> core.LossSpec:
  """LCPO over `base` (= get(f"lcpo({base})")) with initial reliability η₀ = eta0."""
  return dataclasses.replace(core.get(f"lcpo({base})"),
                             init_state=lambda: {"eta": jnp.asarray(eta0, jnp.float32)})
