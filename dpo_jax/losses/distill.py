"""daDPO (Zhang et al., 2025, arXiv 2506.15717): DPO distillation that also uses the teacher."""
import jax

from dpo_jax.losses.core import (PairLogps, lengths, log_sigmoid, register, reward_metrics,
                                 rewards)

TEACHER_KEYS = ("teacher_chosen", "teacher_rejected")


@register("dadpo", extra_keys=TEACHER_KEYS)
def dadpo(logps: PairLogps, *, beta: float = 0.1, beta2: float = 0.1):
  """Sequence-level daDPO: ℓ((β1+β2)Δ_θ − β1Δ_ref − β2Δ_te), Δ_m = S_m(y^t) − S_m(y^s).

  The DPO solution of max E[r] − β1·KL(π‖π_ref) − β2·KL(π‖π_te): the teacher's response y^t is
  the chosen completion, the student's sample y^s the rejected one. β1 = beta, β2 = beta2; the
  teacher's summed log-probs come in logps.extra["teacher_chosen"], ["teacher_rejected"] [B].
  β2 = 0 is DPO. Reconstructed from the objective (LOSSES.md); defaults β1 = β2 = 0.1 are ours.
  Rewards are the implicit ones (β1+β2)S_θ − β1 S_ref − β2 S_te; λ = σ(−z). The token-level form
  is `dadpo_token`. Not in TRL.
  """
  bsum = beta + beta2
  tc = jax.lax.stop_gradient(logps.extra["teacher_chosen"])
  tr = jax.lax.stop_gradient(logps.extra["teacher_rejected"])
  chosen_r = bsum * logps.policy_chosen - beta * logps.ref_chosen - beta2 * tc
  rejected_r = bsum * logps.policy_rejected - beta * logps.ref_rejected - beta2 * tr
  z = chosen_r - rejected_r
  return -log_sigmoid(z), reward_metrics(chosen_r, rejected_r, jax.nn.sigmoid(-z))


KL_KEYS = ("teacher_kl_chosen", "teacher_kl_rejected")


@register("dadpo_token", token_stats=("teacher_kl",), extra_keys=KL_KEYS)
def dadpo_token(logps: PairLogps, *, beta: float = 0.1, beta2: float = 0.1,
                kl_on: str = "both"):
  """Token-level daDPO: ℓ(βh) + β2 · mean over completion tokens of KL(π_te(·|x,y<t) ‖ π_θ(·|x,y<t)).

  DPO on teacher-chosen / student-rejected pairs plus forward-KL distillation of the teacher's
  full next-token distributions (white-box KD), on the tokens of both completions
  (kl_on="both") or of the teacher's response only ("chosen"). The step supplies
  logps.extra["teacher_kl_chosen"/"_rejected"] [B]: the KL summed over each completion's tokens
  (computed chunk by chunk with the student's log-probs; no full-vocabulary logits are kept).
  β2 = 0 is DPO. Reconstructed (LOSSES.md); defaults ours. Not in TRL.
  """
  if kl_on not in ("both", "chosen"):
    raise ValueError(f"kl_on must be 'both' or 'chosen', got {kl_on!r}")
  chosen_r, rejected_r = rewards(logps, beta)
  z = chosen_r - rejected_r
  kl_c, kl_r = logps.extra[KL_KEYS[0]], logps.extra[KL_KEYS[1]]
  if kl_on == "both":
    kl = (kl_c + kl_r) / (lengths(logps.chosen_len) + lengths(logps.rejected_len))
  else:
    kl = kl_c / lengths(logps.chosen_len)
  metrics = reward_metrics(chosen_r, rejected_r, jax.nn.sigmoid(-z))
  metrics["teacher_kl"] = jax.lax.stop_gradient(kl)
  return -log_sigmoid(z) + beta2 * kl, metrics
