"""DPO-Shift (Yang et al., 2025, arXiv 2502.07599): ℓ(β·r_w − λ·β·r_l).

λ < 1 scales down the rejected reward, which counters DPO's tendency to lower the chosen
likelihood. λ = 1 is DPO.
"""
import jax

from dpo_jax.losses.core import PairLogps, log_sigmoid, register, reward_metrics, rewards


@register("dpo_shift")
def dpo_shift(logps: PairLogps, *, beta: float = 0.1, shift: float = 0.75):
  chosen_r, rejected_r = rewards(logps, beta)
  z = chosen_r - shift * rejected_r
  return -log_sigmoid(z), reward_metrics(chosen_r, rejected_r, jax.nn.sigmoid(-z))
