"""daDPO (Zhang et al., 2025, arXiv 2506.15717): DPO distillation that also uses the teacher."""
import jax

from dpo_jax.losses.core import PairLogps, log_sigmoid, register, reward_metrics

TEACHER_KEYS = ("teacher_chosen", "teacher_rejected")


@register("dadpo", extra_keys=TEACHER_KEYS)
def dadpo(logps: PairLogps, *, beta: float = 0.1, beta2: float = 0.1):
  """Sequence-level daDPO: ℓ((β1+β2)Δ_θ − β1Δ_ref − β2Δ_te), Δ_m = S_m(y^t) − S_m(y^s).

  The DPO solution of max E[r] − β1·KL(π‖π_ref) − β2·KL(π‖π_te): the teacher's response y^t is
  the chosen completion, the student's sample y^s the rejected one. β1 = beta, β2 = beta2; the
  teacher's summed log-probs come in logps.extra["teacher_chosen"], ["teacher_rejected"] [B].
  β2 = 0 is DPO. Reconstructed from the objective (LOSSES.md); defaults β1 = β2 = 0.1 are ours.
  Rewards are the implicit ones (β1+β2)S_θ − β1 S_ref − β2 S_te; λ = σ(−z). The paper's token-level
  form (DPO + β2·KL(π_te‖π_θ) per token from teacher logits) is not implemented here. Not in TRL.
  """
  bsum = beta + beta2
  tc = jax.lax.stop_gradient(logps.extra["teacher_chosen"])
  tr = jax.lax.stop_gradient(logps.extra["teacher_rejected"])
  chosen_r = bsum * logps.policy_chosen - beta * logps.ref_chosen - beta2 * tc
  rejected_r = bsum * logps.policy_rejected - beta * logps.ref_rejected - beta2 * tr
  z = chosen_r - rejected_r
  return -log_sigmoid(z), reward_metrics(chosen_r, rejected_r, jax.nn.sigmoid(-z))
