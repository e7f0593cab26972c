"""Pair losses that score each completion's reward u = β·r separately (not only the margin).

λ = ½(|∂L/∂S_θ(y_w)| + |∂L/∂S_θ(y_l)|)/β, the same convention as dpo.py.
"""
import jax
import jax.numpy as jnp

from dpo_jax.losses.core import (PairLogps, grad_weight, log_sigmoid, register, reward_metrics,
                                 rewards, row_weights, running_mean)


def _pair(logps: PairLogps, beta, loss_of_rewards):
  """(loss_B, metrics) for loss = loss_of_rewards(β r_w, β r_l)."""
  def loss_fn(pc, pr):
    return loss_of_rewards(beta * (pc - logps.ref_chosen), beta * (pr - logps.ref_rejected))

  loss = loss_fn(logps.policy_chosen, logps.policy_rejected)
  lam = grad_weight(loss_fn, (logps.policy_chosen, logps.policy_rejected), (1 / beta, 1 / beta))
  chosen_r, rejected_r = rewards(logps, beta)
  return loss, reward_metrics(chosen_r, rejected_r, lam)


@register("nca_pair")
def nca_pair(logps: PairLogps, *, beta: float = 0.1):
  """NCA, pairwise (Chen et al., 2024, arXiv 2402.05369): ℓ(u_w) + ½ℓ(−u_w) + ½ℓ(−u_l).

  Matches TRL loss_type="nca_pair".
  """
  return _pair(logps, beta, lambda uw, ul: (-log_sigmoid(uw) - 0.5 * log_sigmoid(-uw)
                                            - 0.5 * log_sigmoid(-ul)))


@register("sppo_hard")
def sppo_hard(logps: PairLogps, *, beta: float = 0.1):
  """SPPO with hard win probabilities (Wu et al., 2024, arXiv 2405.00675, Eq. 4.7, P ∈ {0, 1}).

  (r_w − 1/(2β))² + (r_l + 1/(2β))². Matches TRL loss_type="sppo_hard".
  """
  return _pair(logps, beta, lambda uw, ul: ((uw - 0.5) / beta) ** 2 + ((ul + 0.5) / beta) ** 2)


@register("apo_zero")
def apo_zero(logps: PairLogps, *, beta: float = 0.1):
  """Anchored PO, zero anchor (D'Oosterlinck et al., 2024, arXiv 2408.06266, Eq. 7).

  (1 − σ(u_w)) + σ(u_l): raise the chosen, lower the rejected likelihood. Matches TRL
  loss_type="apo_zero".
  """
  return _pair(logps, beta, lambda uw, ul: jax.nn.sigmoid(-uw) + jax.nn.sigmoid(ul))


@register("apo_down")
def apo_down(logps: PairLogps, *, beta: float = 0.1):
  """Anchored PO, down anchor (arXiv 2408.06266, Eq. 8): σ(u_w) + (1 − σ(u_w − u_l)).

  Lowers both likelihoods, the rejected more. Matches TRL loss_type="apo_down".
  """
  return _pair(logps, beta, lambda uw, ul: jax.nn.sigmoid(uw) + jax.nn.sigmoid(ul - uw))


# BCO's δ: a count-weighted running mean of every reward β·r seen, the current batch included.
def delta_init_state() -> dict:
  return {"delta": jnp.zeros((), jnp.float32), "delta_count": jnp.zeros((), jnp.float32)}


def delta_update_state(state: dict, metrics: dict) -> dict:
  """The loss already folded this batch into δ; its metrics carry the new value and count."""
  del state
  return {"delta": jnp.asarray(metrics["delta"], jnp.float32),
          "delta_count": jnp.asarray(metrics["delta_count"], jnp.float32)}


def fold_delta(rewards, delta, delta_count, weights, training: bool):
  """(δ, count) with these rewards folded in (running_mean); in evaluation the stored ones."""
  if training:
    return running_mean(rewards, delta, delta_count, weights)
  return jnp.asarray(delta, jnp.float32), jnp.asarray(delta_count, jnp.float32)


@register("bco_pair", init_state=delta_init_state, update_state=delta_update_state,
          batch_coupled=True)
def bco_pair(logps: PairLogps, *, beta: float = 0.1, use_delta: bool = True,
             delta: float = 0.0, delta_count: float = 0.0, training: bool = True):
  """BCO on pairs (Jung et al., 2024, arXiv 2404.04656): ℓ(u_w − δ) + ℓ(−(u_l − δ)).

  use_delta=True (default): δ = running mean of all β·r seen (chosen and rejected, this batch
  included, no gradient), as TRL 0.19 did; `delta`/`delta_count` are the loss state.
  use_delta=False: δ = 0, which matches TRL main loss_type="bco_pair" (it dropped δ). TRL 0.19
  weighted every step's batch mean equally; we weight by reward count (equal for equal batches).
  metrics["delta"], ["delta_count"] are the updated state either way. The loss is batch-coupled,
  so under gradient accumulation the step folds the whole batch into δ at once.
  training=False (evaluation, LossSpec.at_eval): δ is the stored mean, without this batch, and
  the metrics report the state unchanged (TRL evaluates without updating its RunningMoments).
  """
  chosen_r, rejected_r = rewards(logps, beta)
  w = row_weights(logps)
  new_delta, new_count = fold_delta(jnp.concatenate([chosen_r, rejected_r]), delta, delta_count,
                                    jnp.concatenate([w, w]), training)
  d = new_delta if use_delta else 0.0
  loss, metrics = _pair(logps, beta, lambda uw, ul: -log_sigmoid(uw - d) - log_sigmoid(d - ul))
  metrics.update(delta=new_delta, delta_count=new_count)
  return loss, metrics
