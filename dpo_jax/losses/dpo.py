"""DPO and the losses that replace its link function on the margin h = r_w − r_l.

Every loss here is f(z) of one logit z built from the pair; λ (metrics["lambda"]) is
½(|∂L/∂S_θ(y_w)| + |∂L/∂S_θ(y_l)|)/β (times |y| for the length-normalised ones), which is
σ(−βh) for DPO. Nothing here reads the per-token fields.
"""
import jax
import jax.numpy as jnp

from dpo_jax.losses.core import (PairLogps, grad_weight, lengths, log_sigmoid, register,
                                 reward_metrics, rewards)


def _margin_loss(logps: PairLogps, beta, link, *, normalise: bool = False, scale=None):
  """(loss_B, metrics) for loss = link(z), z = β·scale·(score_w − score_l).

  score = r (or r/|y| with normalise=True); `scale` is an optional per-example multiplier.
  """
  len_w = lengths(logps.chosen_len) if normalise else 1.0
  len_l = lengths(logps.rejected_len) if normalise else 1.0
  mult = beta if scale is None else beta * scale

  def loss_fn(pc, pr):
    h = (pc - logps.ref_chosen) / len_w - (pr - logps.ref_rejected) / len_l
    return link(mult * h)

  loss = loss_fn(logps.policy_chosen, logps.policy_rejected)
  lam = grad_weight(loss_fn, (logps.policy_chosen, logps.policy_rejected),
                    (len_w / beta, len_l / beta))
  chosen_r, rejected_r = rewards(logps, beta)
  return loss, reward_metrics(chosen_r, rejected_r, lam)


@register("dpo", aliases=("sigmoid",))
def dpo(logps: PairLogps, *, beta: float = 0.1):
  """DPO (Rafailov et al., 2023, arXiv 2305.18290): ℓ(βh), β applied once.

  Matches TRL loss_type="sigmoid" with label_smoothing=0 and f_divergence_type="reverse_kl"
  (TRL's smoothing lives in our `cdpo`, its f-divergences in `fdpo`).
  """
  chosen_r, rejected_r = rewards(logps, beta)
  z = chosen_r - rejected_r
  return -log_sigmoid(z), reward_metrics(chosen_r, rejected_r, jax.nn.sigmoid(-z))


@register("cdpo")
def cdpo(logps: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.1):
  """Conservative DPO (Mitchell, 2023 note): (1−ε)ℓ(βh) + εℓ(−βh).

  Differs from TRL by being its own loss: TRL puts this inside loss_type="sigmoid" via
  label_smoothing (default 0); our `dpo` never smooths. Default ε=0.1 is ours.
  """
  eps = label_smoothing
  return _margin_loss(logps, beta, lambda z: -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z))


@register("robust", aliases=("rdpo",))
def robust(logps: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.1):
  """rDPO (Chowdhury et al., 2024, arXiv 2403.00409): [(1−ε)ℓ(βh) − εℓ(−βh)] / (1−2ε).

  Matches TRL loss_type="robust". ε ∈ [0, 0.5); the loss can go negative. Default ε=0.1 is ours.
  """
  eps = label_smoothing
  if isinstance(eps, (int, float)) and not 0.0 <= eps < 0.5:
    raise ValueError(f"robust needs 0 <= label_smoothing < 0.5, got {eps}")
  return _margin_loss(
      logps, beta,
      lambda z: (-(1 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1 - 2 * eps))


@register("ipo")
def ipo(logps: PairLogps, *, beta: float = 0.1):
  """IPO (Azar et al., 2023, arXiv 2310.12036, Eq. 17): (h̄ − 1/(2β))², h̄ = r_w/|y_w| − r_l/|y_l|.

  Matches TRL loss_type="ipo" (length-normalised, lengths clamped at 1); β is the paper's τ.
  """
  # The link takes z = βh̄: (h̄ − 1/(2β))² = (z − ½)² / β².
  return _margin_loss(logps, beta, lambda z: ((z - 0.5) / beta) ** 2, normalise=True)


@register("sigmoid_norm")
def sigmoid_norm(logps: PairLogps, *, beta: float = 0.1):
  """Length-normalised DPO (Tülu 3, arXiv 2411.15124): ℓ(βh̄).

  Matches TRL loss_type="sigmoid_norm".
  """
  return _margin_loss(logps, beta, lambda z: -log_sigmoid(z), normalise=True)


@register("hinge")
def hinge(logps: PairLogps, *, beta: float = 0.1):
  """SLiC / RSO hinge (Zhao et al., 2023, arXiv 2305.10425; Liu et al., arXiv 2309.06657).

  max(0, 1 − βh): margin 1/β. Matches TRL loss_type="hinge".
  """
  return _margin_loss(logps, beta, lambda z: jax.nn.relu(1.0 - z))


@register("exo_pair")
def exo_pair(logps: PairLogps, *, beta: float = 0.1, label_smoothing: float = 1e-3):
  """EXO (Ji et al., 2024, arXiv 2402.00856, Eq. 16), pairwise: KL(q ‖ [1−ε, ε]), q = σ(βh).

  Matches TRL loss_type="exo_pair" (which requires label_smoothing > 0; ours defaults to 1e-3).
  """
  eps = label_smoothing
  if isinstance(eps, (int, float)) and not 0.0 < eps < 1.0:
    raise ValueError(f"exo_pair needs 0 < label_smoothing < 1, got {eps}")

  def link(z):
    log_q, log_1mq = log_sigmoid(z), log_sigmoid(-z)
    return (jnp.exp(log_q) * (log_q - jnp.log1p(-eps))
            + jnp.exp(log_1mq) * (log_1mq - jnp.log(eps)))

  return _margin_loss(logps, beta, link)


@register("discopop")
def discopop(logps: PairLogps, *, beta: float = 0.1, tau: float = 0.05):
  """DiscoPOP / log-ratio modulated loss (Chan Lu et al., 2024, arXiv 2406.08414, Eq. 5).

  z = βh, m = σ(z/τ): (1−m)ℓ(z) + m·e^{−z}. Matches TRL loss_type="discopop" (τ = TRL's
  discopop_tau); m·e^{−z} is computed as exp(log σ(z/τ) − z), which TRL's e^{−z} overflows for
  very negative z (exponent clamped at 50, reached only for τ > 1).
  """
  def link(z):
    return (jax.nn.sigmoid(-z / tau) * -log_sigmoid(z)
            + jnp.exp(jnp.minimum(log_sigmoid(z / tau) - z, 50.0)))

  return _margin_loss(logps, beta, link)


@register("dpop")
def dpop(logps: PairLogps, *, beta: float = 0.1, dpop_lambda: float = 50.0):
  """DPO-Positive (Pal et al., 2024, "Smaug", arXiv 2402.13228, Eq. 3).

  ℓ(β[h − λ·max(0, S_ref(y_w) − S_θ(y_w))]): penalises the chosen log-prob falling below the
  reference's. λ = dpop_lambda (50 as in the paper's experiments). Not in TRL.
  """
  def loss_fn(pc, pr):
    h = (pc - logps.ref_chosen) - (pr - logps.ref_rejected)
    return -log_sigmoid(beta * (h - dpop_lambda * jax.nn.relu(logps.ref_chosen - pc)))

  loss = loss_fn(logps.policy_chosen, logps.policy_rejected)
  lam = grad_weight(loss_fn, (logps.policy_chosen, logps.policy_rejected), (1 / beta, 1 / beta))
  chosen_r, rejected_r = rewards(logps, beta)
  return loss, reward_metrics(chosen_r, rejected_r, lam)


@register("mallows", token_stats=("ref_entropy",), extra_keys=("ref_entropy",))
def mallows(logps: PairLogps, *, beta: float = 0.1, c: float = 0.29):
  """MallowsPO-θ (Chen et al., 2024, arXiv 2405.14953): ℓ(β·φ(x)·h), φ(x) = −c·log H̄_ref(x).

  φ is the paper's entropy proxy for the negative log dispersion −log ϕ(x), scaled by its
  hyperparameter (c = φ*). logps.extra["ref_entropy"] [B] must hold H̄_ref(x): the reference's
  next-token entropy averaged over the completion tokens of y_w and y_l (mean of the two
  per-completion token means), divided by log V, so H̄ ∈ (0, 1]; it is clipped to [1e-6, 1].
  λ = φ·σ(−z) (the DPO weight times the per-prompt scale). Not in TRL.
  """
  ent = jnp.clip(jax.lax.stop_gradient(logps.extra["ref_entropy"]), 1e-6, 1.0)
  phi = -c * jnp.log(ent)
  loss, metrics = _margin_loss(logps, beta, lambda z: -log_sigmoid(z), scale=phi)
  metrics["mallows/phi"] = phi
  return loss, metrics
