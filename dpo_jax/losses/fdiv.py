"""f-DPO (Wang et al., 2023, "Beyond Reverse KL", arXiv 2309.16240).

The reward r = S_θ − S_ref is replaced by f'(π/π_ref) (constants dropped) before the DPO loss:
ℓ(β[g(r_w) − g(r_l)]) with

    reverse_kl           g(r) = r                        (plain DPO)
    forward_kl           g(r) = −e^{−r}
    js (js_divergence)   g(r) = log σ(r)
    alpha (alpha_divergence)  g(r) = e^{(α−1) r} / (α−1);  α = f_alpha, α → 1 is reverse KL

Matches TRL main loss_type="sigmoid" with f_divergence_type=... and f_alpha_divergence_coef=α,
except: exponents are clamped at 50 (TRL clamps alpha's at 80 in f32 and forward_kl's not at
all), and TRL applies the f-score to every loss type while we only offer it for DPO.
"""

from dpo_jax.losses.core import (PairLogps, clamped_exp, grad_weight, log_sigmoid, register,
                                 reward_metrics, rewards)

_MAX_EXPONENT = 50.0


def f_score(r, divergence: str, f_alpha: float):
  """g(r) for the named divergence."""
  if divergence == "reverse_kl":
    return r
  if divergence == "forward_kl":
    return -clamped_exp(-r, _MAX_EXPONENT)
  if divergence in ("js", "js_divergence"):
    return log_sigmoid(r)
  if divergence in ("alpha", "alpha_divergence"):
    if abs(f_alpha - 1.0) < 1e-6:
      return r
    return clamped_exp((f_alpha - 1.0) * r, _MAX_EXPONENT) / (f_alpha - 1.0)
  raise ValueError(f"unknown divergence {divergence!r}; expected reverse_kl, forward_kl, js, alpha")


@register("fdpo", aliases=("f_divergence",))
def fdpo(logps: PairLogps, *, beta: float = 0.1, divergence: str = "reverse_kl",
         f_alpha: float = 0.5):
  """ℓ(β[g(r_w) − g(r_l)]) for divergence ∈ {reverse_kl, forward_kl, js, alpha}; see module doc.

  Rewards in the metrics stay β·r (as TRL logs them); λ = ½(|∂L/∂S_θ(y_w)| + |∂L/∂S_θ(y_l)|)/β.
  f_alpha defaults to 0.5, as TRL main's f_alpha_divergence_coef (TRL 0.19 had 1.0).
  """
  def loss_fn(pc, pr):
    gw = f_score(pc - logps.ref_chosen, divergence, f_alpha)
    gl = f_score(pr - logps.ref_rejected, divergence, f_alpha)
    return -log_sigmoid(beta * (gw - gl))

  loss = loss_fn(logps.policy_chosen, logps.policy_rejected)
  lam = grad_weight(loss_fn, (logps.policy_chosen, logps.policy_rejected), (1 / beta, 1 / beta))
  chosen_r, rejected_r = rewards(logps, beta)
  return loss, reward_metrics(chosen_r, rejected_r, lam)
