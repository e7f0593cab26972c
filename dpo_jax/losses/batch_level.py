"""AOT: alignment via optimal transport (Melnyk et al., 2024, arXiv 2406.05882).

Both losses sort over the batch they receive. Under jax.jit with the batch sharded over devices
the arrays are global, so jnp.sort is a global sort (not per shard); the step must not vmap or
shard_map these losses over data shards. Padding rows (logps.valid == 0) sort after every real
row and pair with each other, so real rows are ranked among themselves.

The loss of rank k is returned at the example whose first sorted quantity (u for aot, r_w for
aot_unpaired) has rank k, so padding ranks land on padding rows and a per-example mask works;
the batch mean equals TRL's (which leaves it in rank order). λ = ½(|∂ΣL/∂S_θ(y_w)_i| +
|∂ΣL/∂S_θ(y_l)_i|)/β routes back through the sort, so it is per example.
"""
import jax
import jax.numpy as jnp

from dpo_jax.losses.core import (PairLogps, grad_weight, log_sigmoid, register, reward_metrics,
                                 rewards)

_PAD = 3e38  # sorts after every real value; PAD − PAD = 0 keeps padding ranks finite


def _smoothed(delta, beta, eps):
  return -(1 - eps) * log_sigmoid(beta * delta) - eps * log_sigmoid(-beta * delta)


def _sort_pair(a, b, valid):
  """(sorted a, sorted b, rank of each example in a), padding rows last."""
  if valid is not None:
    real = jax.lax.stop_gradient(valid) > 0
    a, b = jnp.where(real, a, _PAD), jnp.where(real, b, _PAD)
  order = jnp.argsort(jax.lax.stop_gradient(a))  # stable
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
  return jnp.sort(a), jnp.sort(b), rank


def _sorted_loss(logps: PairLogps, beta, eps, pair_to_sort):
  def loss_fn(pc, pr):
    a_sorted, b_sorted, rank = _sort_pair(*pair_to_sort(pc, pr), logps.valid)
    return _smoothed(a_sorted - b_sorted, beta, eps)[rank]

  loss = loss_fn(logps.policy_chosen, logps.policy_rejected)
  lam = grad_weight(loss_fn, (logps.policy_chosen, logps.policy_rejected), (1 / beta, 1 / beta))
  chosen_r, rejected_r = rewards(logps, beta)
  return loss, reward_metrics(chosen_r, rejected_r, lam)


@register("aot", batch_coupled=True)
def aot(logps: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0):
  """AOT paired: δ_(k) = sort(S_θw − S_θl)_k − sort(S_refw − S_refl)_k; (1−ε)ℓ(βδ) + εℓ(−βδ).

  Matches TRL loss_type="aot" (batch mean; per example see the module doc).
  """
  return _sorted_loss(logps, beta, label_smoothing,
                      lambda pc, pr: (pc - pr, logps.ref_chosen - logps.ref_rejected))


@register("aot_unpaired", batch_coupled=True)
def aot_unpaired(logps: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0):
  """AOT unpaired: δ_(k) = sort(r_w)_k − sort(r_l)_k; (1−ε)ℓ(βδ) + εℓ(−βδ).

  Matches TRL loss_type="aot_unpaired" (TRL 0.19's "aot_pair"; batch mean, see the module doc).
  """
  return _sorted_loss(logps, beta, label_smoothing,
                      lambda pc, pr: (pc - logps.ref_chosen, pr - logps.ref_rejected))
