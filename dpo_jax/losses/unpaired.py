"""Unpaired losses (unpaired=True): rows are {prompt, completion, label}.

logps.policy_chosen / ref_chosen hold the completion's summed log-probs, logps.label [B] is 1.0
for desirable and 0.0 for undesirable rows. KTO also reads policy_rejected / ref_rejected: the
log-probs of the mismatched completion y_{i+1} under prompt x_i (its KL reference point).
Reward metrics are group means (core.GroupMean); λ = |∂L/∂S_θ(y)|/β per example.
"""
import jax
import jax.numpy as jnp

from dpo_jax.losses.core import (PairLogps, grad_weight, log_sigmoid, register, row_weights,
                                 unpaired_reward_metrics, weighted_mean)
from dpo_jax.losses.pointwise import delta_init_state, delta_update_state, fold_delta


def _unpaired(logps: PairLogps, beta, loss_of_reward):
  """(loss_B, metrics) for loss = loss_of_reward(β r, label)."""
  if logps.label is None:  # NPO: every row is a forget (undesirable) example
    label = jnp.zeros_like(logps.policy_chosen)
  else:
    label = logps.label.astype(jnp.float32)

  def loss_fn(pc):
    return loss_of_reward(beta * (pc - logps.ref_chosen), label)

  loss = loss_fn(logps.policy_chosen)
  lam = grad_weight(loss_fn, (logps.policy_chosen,), (1 / beta,))
  return loss, unpaired_reward_metrics(beta * (logps.policy_chosen - logps.ref_chosen), label, lam,
                                       row_weights(logps))


@register("kto", unpaired=True, batch_coupled=True)
def kto(logps: PairLogps, *, beta: float = 0.1, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0):
  """KTO (Ethayarajh et al., 2024, arXiv 2402.01306).

  desirable: λ_D(1 − σ(β(r − z0))), undesirable: λ_U(1 − σ(β(z0 − r))), with
  z0 = max(0, mean_batch(S_θ − S_ref on mismatched pairs)), no gradient. The mean runs over the
  real rows of the whole [B] batch this function gets (global under jit). Matches TRL KTOTrainer loss_type="kto"
  (λ_D, λ_U = desirable_weight, undesirable_weight); metrics["kl"] is z0.
  """
  kl = jax.lax.stop_gradient(jnp.maximum(
      weighted_mean(logps.policy_rejected - logps.ref_rejected, row_weights(logps)), 0.0))

  def loss_of_reward(u, label):
    # 1 − σ(x) = σ(−x), exact where σ(x) rounds to 1.
    return (label * desirable_weight * jax.nn.sigmoid(beta * kl - u)
            + (1 - label) * undesirable_weight * jax.nn.sigmoid(u - beta * kl))

  loss, metrics = _unpaired(logps, beta, loss_of_reward)
  metrics["kl"] = kl
  return loss, metrics


@register("bco", unpaired=True, init_state=delta_init_state, update_state=delta_update_state,
          batch_coupled=True)
def bco(logps: PairLogps, *, beta: float = 0.1, use_delta: bool = True, delta: float = 0.0,
        delta_count: float = 0.0, training: bool = True):
  """BCO (Jung et al., 2024, arXiv 2404.04656), unpaired.

  desirable: ℓ(βr − δ), undesirable: w·ℓ(−(βr − δ)). δ as in bco_pair: the count-weighted running
  mean of all β·r seen, this batch included (TRL BCOTrainer's RunningMoments); use_delta=False
  sets δ = 0 (what TRL main's DPO bco_pair does); training=False: the stored δ (bco_pair).
  Optional UDM weight w: logps.extra["udm_weight"] [B] (used on undesirable rows only; see
  `udm_weight`), else 1. The train step sets no udm_weight (dpo_jax has no prompt classifier),
  so training uses w = 1; a caller of the loss may pass one. Matches TRL BCOTrainer.
  """
  rewards = beta * (logps.policy_chosen - logps.ref_chosen)
  new_delta, new_count = fold_delta(rewards, delta, delta_count, row_weights(logps), training)
  d = new_delta if use_delta else 0.0
  weight = 1.0
  if logps.extra is not None and "udm_weight" in logps.extra:
    weight = jax.lax.stop_gradient(logps.extra["udm_weight"])

  def loss_of_reward(u, label):
    return label * -log_sigmoid(u - d) + (1 - label) * weight * -log_sigmoid(d - u)

  loss, metrics = _unpaired(logps, beta, loss_of_reward)
  metrics.update(delta=new_delta, delta_count=new_count)
  return loss, metrics


def udm_weight(prob_desirable, min_ratio: float = 0.5, max_ratio: float = 10.0):
  """BCO's underlying-distribution-matching weight clamp(p/(1−p), min, max) from a prompt
  classifier's P(desirable | x) (TRL BCOConfig.min/max_density_ratio defaults)."""
  return jnp.clip(prob_desirable / (1.0 - prob_desirable + 1e-8), min_ratio, max_ratio)


@register("npo", unpaired=True)
def npo(logps: PairLogps, *, beta: float = 0.1):
  """NPO (Zhang et al., 2024, arXiv 2404.05868): −(2/β)·log σ(−β r(y)) on forget data.

  Every row is a forget example (label is ignored; its metrics are "rejected"). Not in TRL.
  λ = |∂L/∂S_θ(y)|/β = 2σ(βr)/β (the paper's adaptive weight 2σ(βr), divided by β).
  """
  return _unpaired(logps._replace(label=None), beta,
                   lambda u, label: -(2.0 / beta) * log_sigmoid(-u))
