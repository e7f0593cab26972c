"""Reference-free losses: they read only policy log-probs (needs_ref=False).

NLL terms ("sft", and inside cpo / orpo) are token means over the chosen completions; with
normalize="batch" (default) the step's batch mean equals TRL's cross-entropy over all chosen
tokens of the batch, with normalize="example" each example is its own token mean. λ is σ(−z) of
the preference logit z (α for sft).
"""
import jax
import jax.numpy as jnp

from dpo_jax.losses.core import (PairLogps, chosen_nll, lengths, log1mexp, log_sigmoid, register,
                                 reward_metrics)


@register("sft", aliases=("rpo",), needs_ref=False, batch_coupled=True)
def sft(logps: PairLogps, *, alpha: float = 1.0, normalize: str = "batch"):
  """α · NLL of the chosen completion (RPO, Pang et al., 2024, arXiv 2404.19733, as a term).

  Matches TRL loss_type="sft" (α = its loss weight) and TRL 0.19's rpo_alpha NLL term. Combine
  with a preference loss by weights, e.g. "sigmoid:0.8+bco_pair:0.2+sft:1.0" (MPO). Rewards in
  the metrics are the mean token log-probs m(y).
  """
  loss = alpha * chosen_nll(logps, normalize)
  m_w = logps.policy_chosen / lengths(logps.chosen_len)
  m_l = (logps.policy_rejected / lengths(logps.rejected_len)
         if logps.rejected_len is not None else jnp.zeros_like(m_w))
  return loss, reward_metrics(m_w, m_l, jnp.full_like(m_w, alpha))


@register("simpo", needs_ref=False)
def simpo(logps: PairLogps, *, beta: float = 2.0, gamma: float = 0.5):
  """SimPO (Meng et al., 2024, arXiv 2405.14734): ℓ(β(m_w − m_l) − γ), m = S/|y|.

  γ is the absolute margin (the SimPO repo's config gives γ/β instead). Matches TRL CPOTrainer
  loss_type="simpo" with cpo_alpha=0 (simpo_gamma = γ). Defaults β=2.0, γ=0.5 (TRL's
  simpo_gamma); the paper tunes β ∈ [2, 2.5], γ ∈ [0.5, 1.6].
  """
  chosen_r = beta * logps.policy_chosen / lengths(logps.chosen_len)
  rejected_r = beta * logps.policy_rejected / lengths(logps.rejected_len)
  z = chosen_r - rejected_r - gamma
  return -log_sigmoid(z), reward_metrics(chosen_r, rejected_r, jax.nn.sigmoid(-z))


@register("cpo", needs_ref=False, batch_coupled=True)
def cpo(logps: PairLogps, *, beta: float = 0.1, alpha: float = 1.0, normalize: str = "batch"):
  """CPO (Xu et al., 2024, arXiv 2401.08417): ℓ(β(S_θw − S_θl)) + α·NLL(y_w).

  Matches TRL CPOTrainer loss_type="sigmoid" with cpo_alpha=α, label_smoothing=0.
  """
  chosen_r, rejected_r = beta * logps.policy_chosen, beta * logps.policy_rejected
  z = chosen_r - rejected_r
  loss = -log_sigmoid(z) + alpha * chosen_nll(logps, normalize)
  return loss, reward_metrics(chosen_r, rejected_r, jax.nn.sigmoid(-z))


@register("orpo", needs_ref=False, batch_coupled=True)
def orpo(logps: PairLogps, *, beta: float = 0.1, normalize: str = "batch"):
  """ORPO (Hong et al., 2024, arXiv 2403.07691): NLL(y_w) − β·log σ(log_odds).

  log_odds = (m_w − m_l) − (log(1 − e^{m_w}) − log(1 − e^{m_l})), m = S/|y| (clamped just
  below 0), with a stable log1mexp. β is the paper's λ (TRL ORPOConfig.beta). Matches TRL
  ORPOTrainer. Rewards are β·m (as TRL logs them).
  """
  m_w = logps.policy_chosen / lengths(logps.chosen_len)
  m_l = logps.policy_rejected / lengths(logps.rejected_len)
  log_odds = (m_w - m_l) - (log1mexp(m_w) - log1mexp(m_l))
  loss = chosen_nll(logps, normalize) - beta * log_sigmoid(log_odds)
  metrics = reward_metrics(beta * m_w, beta * m_l, jax.nn.sigmoid(-log_odds))
  metrics["log_odds_chosen"] = jax.lax.stop_gradient(log_odds)  # TRL's metric names
  metrics["log_odds_ratio"] = jax.lax.stop_gradient(log_sigmoid(log_odds))
  return loss, metrics
