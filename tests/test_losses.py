"""Every registered loss against an independent NumPy float64 restatement of its formula.

The references below are written from LOSSES.md / the papers, not from dpo_jax's code. Each
check records max |jax − numpy|; `python tests/test_losses.py` prints them as a markdown table.
"""
import dataclasses
import inspect
import os
import sys
from typing import Any, Callable, Optional

if __name__ == "__main__":  # `python tests/test_losses.py`: what pytest + conftest set up otherwise
  sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                  os.path.dirname(os.path.abspath(__file__))]
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dpo_jax import losses  # noqa: E402

B, T = 48, 12  # rows per test batch (one shape everywhere keeps eager dispatch caches warm)
SEEDS = (0, 1, 2)  # each value check runs on one batch made of these seeds' rows (B/3 each)
SCALES = ("normal", "wide", "large")
# (loss, test) -> (max |jax − numpy|, max |jax − numpy| / max(1, |numpy|))
DEVIATIONS: dict[tuple[str, str], tuple[float, float]] = {}


def record(loss: str, test: str, got, want, rtol: float = 1e-5, atol: float = 1e-5):
  """assert_allclose, remembering the largest deviation per (loss, test)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  diff = np.abs(got - want)
  dev = float(np.max(diff)) if got.size else 0.0
  rel = float(np.max(diff / np.maximum(1.0, np.abs(want)))) if got.size else 0.0
  old = DEVIATIONS.get((loss, test), (0.0, 0.0))
  DEVIATIONS[(loss, test)] = (max(old[0], dev), max(old[1], rel))
  np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"{loss} / {test}")


def deviation_table(summary: bool = False) -> str:
  """Markdown: one row per (loss, test), or with summary=True one row per (loss, kind of test)."""
  rows = ["| loss | test | max abs deviation | max abs dev / max(1, abs(numpy)) |",
          "|---|---|---|---|"]
  items = DEVIATIONS.items()
  if summary:
    kinds = {}
    for (loss, test), (dev, rel) in items:
      kind = ("λ (finite differences or closed form)" if " λ " in test else
              "loss, margins to ±2e4 and S = −1e6 rows" if "(large)" in test else
              "loss, normal + wide margins" if "(normal)" in test or "(wide)" in test else
              "metrics / state / jit / sharding / combine")
      old = kinds.get((loss, kind), (0.0, 0.0))
      kinds[(loss, kind)] = (max(old[0], dev), max(old[1], rel))
    items = kinds.items()
  for (loss, test), (dev, rel) in sorted(items):
    rows.append(f"| {loss} | {test} | {dev:.2e} | {rel:.2e} |")
  return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# Random batches. Token log-probs are drawn per position; summed fields are their f32 sums, so
# JAX and NumPy see the same numbers. "large" makes |margins| reach ~1e4 (naive exp overflows).
# ---------------------------------------------------------------------------------------------


def make_batch(seed: int, scale: str = "normal", unpaired: bool = False, n: int = B) -> dict:
  rng = np.random.default_rng(seed)
  lw = rng.integers(1, T + 1, n)
  ll = rng.integers(1, T + 1, n)
  size = {"normal": 2.0, "wide": 20.0, "large": 1500.0}[scale]
  noise = {"normal": 0.3, "wide": 5.0, "large": 1500.0}[scale]

  def tokens(length, base=None):
    t = -rng.uniform(0.01, size, (n, T)) if base is None else base
    t = t + (0 if base is None else rng.normal(0, noise, (n, T)))
    t = np.minimum(t, -1e-3)
    return np.where(np.arange(T)[None] < length[:, None], t, 0.0).astype(np.float32)

  b = {"lw": lw, "ll": ll}
  b["tpc"], b["tpr"] = tokens(lw), tokens(ll)
  b["trc"], b["trr"] = tokens(lw, b["tpc"]), tokens(ll, b["tpr"])
  for k, t in (("pc", "tpc"), ("pr", "tpr"), ("rc", "trc"), ("rr", "trr")):
    b[k] = b[t].sum(1, dtype=np.float32)
  b["tc"] = (b["pc"] + rng.normal(0, noise * 2, n)).astype(np.float32)
  b["tr"] = (b["pr"] + rng.normal(0, noise * 2, n)).astype(np.float32)
  # log Σ_v p_v² lies in [2 log p_t, 0].
  lss = lambda t, L: np.where(np.arange(T)[None] < L[:, None],
                              np.maximum(2 * t, -rng.uniform(0.05, 3.0, (n, T))), 0.0)
  b["lss_c"] = lss(b["tpc"], lw).astype(np.float32)
  b["lss_r"] = lss(b["tpr"], ll).astype(np.float32)
  b["ent"] = rng.uniform(0.02, 1.0, n).astype(np.float32)
  b["udm"] = rng.uniform(0.5, 10.0, n).astype(np.float32)
  kl_rng = np.random.default_rng(n)  # separate stream: keeps the draws above and below unchanged
  b["klc"], b["klr"] = kl_rng.uniform(0.0, 5.0, (2, n)).astype(np.float32)
  label = rng.integers(0, 2, n)
  label[:2] = (0, 1)
  b["label"] = label.astype(np.float32)
  if scale == "large":  # beyond the random ±2e4 margins: one row at S = −1e6 (exponent clamps)
    b["pc"][2] = -1e6
    b["pr"][3] = -1e6
  b["unpaired"] = unpaired
  return b


def make_batches(seeds, scale="normal", unpaired=False) -> dict:
  """Several seeds' batches stacked into one (row-coupled losses see all rows together)."""
  parts = [make_batch(s, scale, unpaired, n=B // len(seeds)) for s in seeds]
  out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "unpaired"}
  out["unpaired"] = unpaired
  return out


def to_logps(b: dict, ref: bool = True, extra: bool = True) -> losses.PairLogps:
  f = lambda k: jnp.asarray(b[k], jnp.float32)
  ex = None
  if extra:
    ex = {"policy_chosen_logsumsq": f("lss_c"), "policy_rejected_logsumsq": f("lss_r"),
          "ref_entropy": f("ent"), "teacher_chosen": f("tc"), "teacher_rejected": f("tr"),
          "teacher_kl_chosen": f("klc"), "teacher_kl_rejected": f("klr")}
    if b.get("use_udm"):
      ex["udm_weight"] = f("udm")
  return losses.PairLogps(
      policy_chosen=f("pc"), policy_rejected=f("pr"),
      ref_chosen=f("rc") if ref else None, ref_rejected=f("rr") if ref else None,
      chosen_len=jnp.asarray(b["lw"], jnp.int32), rejected_len=jnp.asarray(b["ll"], jnp.int32),
      label=f("label") if b["unpaired"] else None,
      policy_chosen_tokens=f("tpc"), policy_rejected_tokens=f("tpr"),
      ref_chosen_tokens=f("trc") if ref else None, ref_rejected_tokens=f("trr") if ref else None,
      extra=ex)


def f64(b: dict) -> dict:
  return {k: (np.asarray(v, np.float64) if isinstance(v, np.ndarray) else v) for k, v in b.items()}


# ---------------------------------------------------------------------------------------------
# NumPy float64 references, straight from LOSSES.md.
# ---------------------------------------------------------------------------------------------


def ell(z):  # −log σ(z)
  return np.logaddexp(0.0, -z)


def sig(z):
  return np.exp(-np.logaddexp(0.0, -z))


def logsig(z):
  return -np.logaddexp(0.0, -z)


def h_of(b):
  return (b["pc"] - b["rc"]) - (b["pr"] - b["rr"])


def hbar_of(b):
  return (b["pc"] - b["rc"]) / np.maximum(b["lw"], 1) - (b["pr"] - b["rr"]) / np.maximum(b["ll"], 1)


def ref_dpo(b, beta=0.1):
  return ell(beta * h_of(b))


def ref_cdpo(b, beta=0.1, label_smoothing=0.1):
  e = label_smoothing
  return (1 - e) * ell(beta * h_of(b)) + e * ell(-beta * h_of(b))


def ref_robust(b, beta=0.1, label_smoothing=0.1):
  e = label_smoothing
  return ((1 - e) * ell(beta * h_of(b)) - e * ell(-beta * h_of(b))) / (1 - 2 * e)


def ref_ipo(b, beta=0.1):
  return (hbar_of(b) - 1 / (2 * beta)) ** 2


def ref_sigmoid_norm(b, beta=0.1):
  return ell(beta * hbar_of(b))


def ref_hinge(b, beta=0.1):
  return np.maximum(0.0, 1 - beta * h_of(b))


def ref_exo_pair(b, beta=0.1, label_smoothing=1e-3):
  z, e = beta * h_of(b), label_smoothing
  return sig(z) * (logsig(z) - np.log(1 - e)) + sig(-z) * (logsig(-z) - np.log(e))


def ref_nca_pair(b, beta=0.1):
  uw, ul = beta * (b["pc"] - b["rc"]), beta * (b["pr"] - b["rr"])
  return ell(uw) + 0.5 * ell(-uw) + 0.5 * ell(-ul)


def bco_delta(rewards, delta=0.0, delta_count=0.0):
  return (delta * delta_count + np.sum(rewards)) / (delta_count + rewards.size)


def ref_bco_pair(b, beta=0.1, use_delta=True, delta=0.0, delta_count=0.0, frozen_delta=None):
  uw, ul = beta * (b["pc"] - b["rc"]), beta * (b["pr"] - b["rr"])
  d = bco_delta(np.concatenate([uw, ul]), delta, delta_count) if use_delta else 0.0
  d = d if frozen_delta is None else frozen_delta
  return ell(uw - d) + ell(-(ul - d))


def ref_sppo_hard(b, beta=0.1):
  return ((b["pc"] - b["rc"]) - 1 / (2 * beta)) ** 2 + ((b["pr"] - b["rr"]) + 1 / (2 * beta)) ** 2


def aot_ref(u, v, beta, eps):
  """Rank-k loss of sort(u) − sort(v), reported at the example whose u has rank k."""
  d = np.sort(u) - np.sort(v)
  per_rank = (1 - eps) * ell(beta * d) + eps * ell(-beta * d)
  rank = np.empty(len(u), int)
  rank[np.argsort(u, kind="stable")] = np.arange(len(u))
  return per_rank[rank]


def ref_aot(b, beta=0.1, label_smoothing=0.0):
  return aot_ref(b["pc"] - b["pr"], b["rc"] - b["rr"], beta, label_smoothing)


def ref_aot_unpaired(b, beta=0.1, label_smoothing=0.0):
  return aot_ref(b["pc"] - b["rc"], b["pr"] - b["rr"], beta, label_smoothing)


def ref_apo_zero(b, beta=0.1):
  return (1 - sig(beta * (b["pc"] - b["rc"]))) + sig(beta * (b["pr"] - b["rr"]))


def ref_apo_down(b, beta=0.1):
  return sig(beta * (b["pc"] - b["rc"])) + (1 - sig(beta * h_of(b)))


def ref_discopop(b, beta=0.1, tau=0.05):
  z = beta * h_of(b)
  m = sig(z / tau)
  # m·e^{−z} written as one exponential: e^{−z} alone overflows float64 for z < −709.
  return (1 - m) * ell(z) + np.exp(logsig(z / tau) - z)


def ref_dpop(b, beta=0.1, dpop_lambda=50.0):
  return ell(beta * (h_of(b) - dpop_lambda * np.maximum(0.0, b["rc"] - b["pc"])))


def fscore(r, divergence, f_alpha):
  cexp = lambda x: np.exp(np.minimum(x, 50.0))  # the documented exponent clamp
  return {"reverse_kl": lambda: r, "forward_kl": lambda: -cexp(-r),
          "js": lambda: logsig(r),
          "alpha": lambda: cexp((f_alpha - 1) * r) / (f_alpha - 1)}[divergence]()


def ref_fdpo(b, beta=0.1, divergence="reverse_kl", f_alpha=0.5):
  gw = fscore(b["pc"] - b["rc"], divergence, f_alpha)
  gl = fscore(b["pr"] - b["rr"], divergence, f_alpha)
  return ell(beta * (gw - gl))


def nll_ref(b, normalize="batch"):
  if normalize == "batch":  # every chosen token weighs the same; per example: S_i · B / Σ|y|
    return -b["pc"] * len(b["pc"]) / np.sum(b["lw"])
  return -b["pc"] / b["lw"]


def ref_sft(b, alpha=1.0, normalize="batch"):
  return alpha * nll_ref(b, normalize)


def ref_simpo(b, beta=2.0, gamma=0.5):
  return ell(beta * (b["pc"] / b["lw"] - b["pr"] / b["ll"]) - gamma)


def ref_cpo(b, beta=0.1, alpha=1.0, normalize="batch"):
  return ell(beta * (b["pc"] - b["pr"])) + alpha * nll_ref(b, normalize)


def orpo_log_odds(b):
  mw, ml = b["pc"] / b["lw"], b["pr"] / b["ll"]
  return (mw - ml) - (np.log(-np.expm1(mw)) - np.log(-np.expm1(ml)))


def ref_orpo(b, beta=0.1, normalize="batch"):
  return nll_ref(b, normalize) - beta * logsig(orpo_log_odds(b))


def kto_z0(b):
  return max(0.0, float(np.mean(b["pr"] - b["rr"])))


def ref_kto(b, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
  r, z0, y = b["pc"] - b["rc"], kto_z0(b), b["label"]
  return np.where(y == 1, desirable_weight * (1 - sig(beta * (r - z0))),
                  undesirable_weight * (1 - sig(beta * (z0 - r))))


def ref_bco(b, beta=0.1, use_delta=True, delta=0.0, delta_count=0.0, frozen_delta=None):
  u = beta * (b["pc"] - b["rc"])
  d = bco_delta(u, delta, delta_count) if use_delta else 0.0
  d = d if frozen_delta is None else frozen_delta
  w = b["udm"] if b.get("use_udm") else 1.0
  return np.where(b["label"] == 1, ell(u - d), w * ell(-(u - d)))


def ref_npo(b, beta=0.1):
  return -(2 / beta) * logsig(-beta * (b["pc"] - b["rc"]))


def wpo_weight(b, clamp=False):
  mask = lambda L: np.arange(T)[None] < L[:, None]
  mean = lambda t, s, L: np.sum(np.where(mask(L), t - s, 0.0), 1) / L
  w = np.exp(mean(b["tpc"], b["lss_c"], b["lw"])) * np.exp(mean(b["tpr"], b["lss_r"], b["ll"]))
  return np.minimum(w, 1.0) if clamp else w


def ref_wpo(b, clamp=False, base_ref=ref_dpo, **hp):
  return base_ref(b, **hp) * wpo_weight(b, clamp)


def ld_logps(b, ld_alpha):
  shared = np.minimum(b["lw"], b["ll"])
  out = dict(b)
  for s, t, L in (("pc", "tpc", "lw"), ("pr", "tpr", "ll"), ("rc", "trc", "lw"),
                  ("rr", "trr", "ll")):
    total = 0.0
    for k in range(T):  # S_LD = Σ_{t≤ℓ} logp_t + α Σ_{ℓ<t≤|y|} logp_t, positions counted from 1
      pos = k + 1
      w = np.where(pos <= shared, 1.0, ld_alpha) * (pos <= b[L])
      total = total + w * b[t][:, k]
    out[s] = total
  return out


def ref_ld(b, ld_alpha=0.5, base_ref=ref_dpo, **hp):
  return base_ref(ld_logps(b, ld_alpha), **hp)


def ref_mallows(b, beta=0.1, c=0.29):
  phi = -c * np.log(np.clip(b["ent"], 1e-6, 1.0))
  return ell(beta * phi * h_of(b))


def lcpo_parts(b, base_ref, hp, eta, prob):
  swapped = dict(b, pc=b["pr"], pr=b["pc"], rc=b["rr"], rr=b["rc"], lw=b["ll"], ll=b["lw"])
  l_wl, l_lw = base_ref(b, **hp), base_ref(swapped, **hp)
  if prob == "gibbs":  # p ∝ e^{−L}, normalised over the two orderings
    p = np.exp(-l_wl - np.logaddexp(-l_wl, -l_lw))
  else:
    p = np.minimum(np.exp(-l_wl), 1.0)
  w = eta * p / (eta * p + (1 - eta) * (1 - p))
  return l_wl, l_lw, w


def ref_lcpo(b, eta=0.9, eta_momentum=0.9, prob="gibbs", base_ref=ref_dpo, frozen_w=None, **hp):
  l_wl, l_lw, w = lcpo_parts(b, base_ref, hp, eta, prob)
  w = w if frozen_w is None else frozen_w
  return w * l_wl + (1 - w) * l_lw


def ref_dadpo(b, beta=0.1, beta2=0.1):
  z = ((beta + beta2) * (b["pc"] - b["pr"]) - beta * (b["rc"] - b["rr"])
       - beta2 * (b["tc"] - b["tr"]))
  return ell(z)


# ---------------------------------------------------------------------------------------------
# λ references: central finite differences of the reference loss (per example), or closed forms.
# λ = ½(|∂L/∂S_θ(y_w)| + |∂L/∂S_θ(y_l)|)·scale, scale = 1/β (|y|/β length-normalised); unpaired
# losses: |∂L/∂S_θ(y)|/β.
# ---------------------------------------------------------------------------------------------


def fd_lambda(ref, b, hp, keys=("pc", "pr"), scales=None, frozen=None, per_element=False):
  """½ Σ_k |∂(Σ_j L_j)/∂x_k,i| · scale_k by central differences (x_k = S_θ(y_w), S_θ(y_l)).

  Row-separable losses perturb every row at once; per_element=True perturbs one row at a time,
  for losses that couple rows (AOT's sort).
  """
  frozen = frozen or {}
  default = inspect.signature(ref).parameters.get("beta")
  beta = hp.get("beta", default.default if default is not None else 0.1)
  scales = scales or {k: 1.0 / beta for k in keys}
  out = 0.0
  for k in keys:
    step = 1e-6 * np.maximum(1.0, np.abs(b[k]))
    if per_element:
      g = np.zeros(len(b[k]))
      for i in range(len(b[k])):
        e = np.zeros(len(b[k]))
        e[i] = step[i]
        g[i] = (np.sum(ref(dict(b, **{k: b[k] + e}), **hp, **frozen))
                - np.sum(ref(dict(b, **{k: b[k] - e}), **hp, **frozen))) / (2 * step[i])
    else:
      g = (ref(dict(b, **{k: b[k] + step}), **hp, **frozen)
           - ref(dict(b, **{k: b[k] - step}), **hp, **frozen)) / (2 * step)
    out = out + np.abs(g) * scales[k]
  return out / len(keys)


@dataclasses.dataclass
class Case:
  loss: str
  ref: Callable
  hp: dict = dataclasses.field(default_factory=dict)
  test: str = "defaults"
  ref_hp: Optional[dict] = None  # what the NumPy reference gets (default: hp)
  unpaired: bool = False
  needs_ref: bool = True
  lam: Any = "fd"  # "fd" | callable(b, hp) -> λ | None (not checked)
  lam_len: bool = False  # length-normalised: λ scale |y|/β
  freeze: Optional[Callable] = None  # (b, hp) -> kwargs fixing no-gradient quantities for FD
  batch: Optional[dict] = None  # extra batch flags (use_udm)
  # Where λ is checked. forward_kl / alpha subtract e^{|r|}-sized scores: at |r| ~ 50 the f32
  # margin itself is only good to ~1e-3 relative, so their λ is compared on "normal" only.
  lam_scales: tuple = ("normal", "wide")
  per_element: bool = False  # rows are coupled (sorting): finite differences one row at a time

  @property
  def id(self):
    return f"{self.loss}[{self.test}]"


def _beta(case, default=0.1):
  return (case.ref_hp or case.hp).get("beta", default)


CASES = [
    Case("dpo", ref_dpo), Case("dpo", ref_dpo, {"beta": 0.5}, "beta=0.5"),
    Case("sigmoid", ref_dpo, {"beta": 0.05}, "beta=0.05"),
    Case("cdpo", ref_cdpo), Case("cdpo", ref_cdpo, {"label_smoothing": 0.3}, "eps=0.3"),
    Case("robust", ref_robust), Case("robust", ref_robust, {"label_smoothing": 0.4}, "eps=0.4"),
    Case("ipo", ref_ipo, lam_len=True),
    Case("ipo", ref_ipo, {"beta": 0.5}, "beta=0.5", lam_len=True),
    Case("sigmoid_norm", ref_sigmoid_norm, {"beta": 1.0}, "beta=1", lam_len=True),
    Case("hinge", ref_hinge), Case("hinge", ref_hinge, {"beta": 0.5}, "beta=0.5"),
    Case("exo_pair", ref_exo_pair),
    Case("exo_pair", ref_exo_pair, {"label_smoothing": 0.1, "beta": 0.3}, "eps=0.1"),
    Case("nca_pair", ref_nca_pair),
    Case("bco_pair", ref_bco_pair, freeze=lambda b, hp: {"frozen_delta": bco_delta(
        np.concatenate([0.1 * (b["pc"] - b["rc"]), 0.1 * (b["pr"] - b["rr"])]))}),
    Case("bco_pair", ref_bco_pair, {"delta": 0.7, "delta_count": 48.0}, "with state",
         freeze=lambda b, hp: {"frozen_delta": bco_delta(np.concatenate(
             [0.1 * (b["pc"] - b["rc"]), 0.1 * (b["pr"] - b["rr"])]), 0.7, 48.0)}),
    Case("bco_pair", ref_bco_pair, {"use_delta": False}, "use_delta=False (TRL main)"),
    Case("sppo_hard", ref_sppo_hard),
    Case("aot", ref_aot, per_element=True),
    Case("aot", ref_aot, {"label_smoothing": 0.2}, "eps=0.2", per_element=True),
    Case("aot_unpaired", ref_aot_unpaired, per_element=True),
    Case("aot_unpaired", ref_aot_unpaired, {"label_smoothing": 0.2, "beta": 0.3}, "eps=0.2",
         per_element=True),
    Case("apo_zero", ref_apo_zero), Case("apo_down", ref_apo_down),
    Case("discopop", ref_discopop), Case("discopop", ref_discopop, {"tau": 0.5}, "tau=0.5"),
    Case("dpop", ref_dpop), Case("dpop", ref_dpop, {"dpop_lambda": 5.0}, "lambda=5"),
    *[Case("fdpo", ref_fdpo, {"divergence": d, "f_alpha": a},
           f"{d}" + (f",a={a}" if d == "alpha" else ""),
           lam_scales=("normal",) if d in ("forward_kl", "alpha") else ("normal", "wide"))
      for d, a in (("reverse_kl", 0.5), ("forward_kl", 0.5), ("js", 0.5), ("alpha", 0.5),
                   ("alpha", 1.5))],
    Case("fdpo", ref_fdpo, {"divergence": "js_divergence"}, "js_divergence (TRL name)",
         ref_hp={"divergence": "js"}),
    Case("sft", ref_sft, needs_ref=False, lam=lambda b, hp: np.full(len(b["pc"]), 1.0)),
    Case("rpo", ref_sft, {"alpha": 0.5, "normalize": "example"}, "alpha=0.5, per example",
         needs_ref=False, lam=lambda b, hp: np.full(len(b["pc"]), 0.5)),
    Case("simpo", ref_simpo, needs_ref=False,
         lam=lambda b, hp: sig(-(2.0 * (b["pc"] / b["lw"] - b["pr"] / b["ll"]) - 0.5))),
    Case("simpo", ref_simpo, {"beta": 2.5, "gamma": 1.4}, "beta=2.5,gamma=1.4", needs_ref=False,
         lam_len=True),
    Case("cpo", ref_cpo, needs_ref=False, lam=lambda b, hp: sig(-0.1 * (b["pc"] - b["pr"]))),
    Case("cpo", ref_cpo, {"alpha": 0.0, "normalize": "example"}, "alpha=0", needs_ref=False,
         lam=None),
    Case("orpo", ref_orpo, needs_ref=False, lam=lambda b, hp: sig(-orpo_log_odds(b))),
    Case("orpo", ref_orpo, {"beta": 0.5, "normalize": "example"}, "beta=0.5, per example",
         needs_ref=False, lam=None),
    Case("kto", ref_kto, unpaired=True),
    Case("kto", ref_kto, {"beta": 0.3, "desirable_weight": 1.33, "undesirable_weight": 0.7},
         "weights", unpaired=True),
    Case("bco", ref_bco, unpaired=True, freeze=lambda b, hp: {
        "frozen_delta": bco_delta(0.1 * (b["pc"] - b["rc"]))}),
    Case("bco", ref_bco, {"delta": -0.4, "delta_count": 100.0}, "with state + UDM",
         unpaired=True, batch={"use_udm": True}, freeze=lambda b, hp: {
             "frozen_delta": bco_delta(0.1 * (b["pc"] - b["rc"]), -0.4, 100.0)}),
    Case("bco", ref_bco, {"use_delta": False}, "use_delta=False", unpaired=True),
    Case("npo", ref_npo, unpaired=True), Case("npo", ref_npo, {"beta": 0.5}, "beta=0.5",
                                              unpaired=True),
    Case("wpo", ref_wpo), Case("wpo", ref_wpo, {"clamp": True}, "clamp (TRL 0.19)"),
    Case("wpo", ref_wpo, {"base": "ipo", "beta": 0.3}, "base=ipo",
         ref_hp={"base_ref": ref_ipo, "beta": 0.3}, lam_len=True),
    # λ of LD is the base loss's λ with respect to the LD sums.
    Case("ld", ref_ld, lam=lambda b, hp: fd_lambda(ref_dpo, ld_logps(b, 0.5), {})),
    Case("ld", ref_ld, {"ld_alpha": 0.0, "beta": 0.3}, "alpha=0",
         lam=lambda b, hp: fd_lambda(ref_dpo, ld_logps(b, 0.0), {"beta": 0.3})),
    Case("ld", ref_ld, {"ld_alpha": 1.0}, "alpha=1",
         lam=lambda b, hp: fd_lambda(ref_dpo, ld_logps(b, 1.0), {})),
    Case("ld", ref_ld, {"base": "hinge", "ld_alpha": 0.3}, "base=hinge",
         ref_hp={"base_ref": ref_hinge, "ld_alpha": 0.3},
         lam=lambda b, hp: fd_lambda(ref_hinge, ld_logps(b, 0.3), {})),
    Case("mallows", ref_mallows), Case("mallows", ref_mallows, {"c": 1.0, "beta": 0.5}, "c=1"),
    Case("lcpo", ref_lcpo,
         freeze=lambda b, hp: {"frozen_w": lcpo_parts(b, ref_dpo, {}, 0.9, "gibbs")[2]}),
    Case("lcpo", ref_lcpo, {"eta": 0.7, "prob": "exp"}, "eta=0.7, prob=exp",
         freeze=lambda b, hp: {"frozen_w": lcpo_parts(b, ref_dpo, {}, 0.7, "exp")[2]}),
    Case("lcpo", ref_lcpo, {"base": "ipo", "eta": 0.8, "beta": 0.5}, "base=ipo",
         ref_hp={"base_ref": ref_ipo, "eta": 0.8, "beta": 0.5},
         freeze=lambda b, hp: {"frozen_w": lcpo_parts(b, ref_ipo, {"beta": 0.5}, 0.8, "gibbs")[2]}),
    # dadpo's λ is σ(−z) of its logit (scale 1/(β1+β2)).
    Case("dadpo", ref_dadpo, lam=lambda b, hp: fd_lambda(ref_dadpo, b, {}, scales={
        "pc": 1 / 0.2, "pr": 1 / 0.2})),
    Case("dadpo", ref_dadpo, {"beta": 0.05, "beta2": 0.2}, "b1=.05,b2=.2",
         lam=lambda b, hp: fd_lambda(ref_dadpo, b, hp, scales={"pc": 1 / 0.25, "pr": 1 / 0.25})),
]

# (rtol, atol). "large" rows hold S = −1e6, where f32's spacing is 0.06: a difference of two such
# inputs is only known to ~0.03 nats before any loss arithmetic, so atol there is 1e-3 (β ≤ 0.5).
TOL = {"normal": (1e-5, 1e-5), "wide": (1e-5, 1e-5), "large": (1e-5, 1e-3)}


def run_case(case: Case, seeds, scale: str):
  b = make_batches(seeds, scale, case.unpaired)
  b.update(case.batch or {})
  logps = to_logps(b, ref=case.needs_ref)
  loss, metrics = losses.get(case.loss)(logps, **case.hp)
  return b, loss, metrics


def _lam_ref(case: Case, b64: dict):
  hp = case.ref_hp if case.ref_hp is not None else case.hp
  if callable(case.lam):
    return case.lam(b64, case.hp)
  beta = hp.get("beta", 0.1)
  keys = ("pc",) if case.unpaired else ("pc", "pr")
  scales = None
  if case.lam_len:
    scales = {"pc": np.maximum(b64["lw"], 1) / beta, "pr": np.maximum(b64["ll"], 1) / beta}
  frozen = case.freeze(b64, hp) if case.freeze else None
  return fd_lambda(case.ref, b64, hp, keys, scales, frozen, case.per_element)


def check_case(case: Case, seeds, scale: str):
  b, loss, metrics = run_case(case, seeds, scale)
  b64 = f64(b)
  hp = case.ref_hp if case.ref_hp is not None else case.hp
  want = case.ref(b64, **hp)
  assert loss.dtype == jnp.float32 and loss.shape == (len(b["pc"]),)
  assert np.all(np.isfinite(np.asarray(loss))), case.id
  rtol, atol = TOL[scale]
  record(case.loss, f"{case.test} ({scale})", loss, want, rtol, atol)
  if case.lam is not None and scale in case.lam_scales:  # not "large": FD there says little
    record(case.loss, f"{case.test} λ ({scale})", metrics["lambda"], _lam_ref(case, b64),
           1e-4, 1e-5)
  return b64, metrics


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_against_numpy(case, scale):
  check_case(case, SEEDS, scale)


# ---------------------------------------------------------------------------------------------
# Metrics that are not the loss.
# ---------------------------------------------------------------------------------------------

PAIR_REF_LOSSES = ["dpo", "cdpo", "robust", "ipo", "sigmoid_norm", "hinge", "exo_pair",
                   "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
                   "apo_down", "discopop", "dpop", "fdpo", "mallows", "wpo", "lcpo"]


@pytest.mark.parametrize("name", PAIR_REF_LOSSES)
def test_reward_metrics(name):
  b = make_batch(3, "wide")
  _, m = losses.get(name)(to_logps(b), beta=0.2)
  b = f64(b)
  rw, rl = 0.2 * (b["pc"] - b["rc"]), 0.2 * (b["pr"] - b["rr"])
  record(name, "rewards/chosen", m["rewards/chosen"], rw)
  record(name, "rewards/margins", m["rewards/margins"], rw - rl)
  np.testing.assert_array_equal(m["rewards/accuracies"], (rw > rl).astype(np.float32))


def test_special_metrics():
  b = make_batch(4, "wide", unpaired=True)
  b64 = f64(b)
  _, m = losses.get("kto")(to_logps(b))
  record("kto", "kl (z0)", m["kl"], kto_z0(b64))
  u, y = 0.1 * (b64["pc"] - b64["rc"]), b64["label"]
  record("kto", "rewards/chosen (group mean)", m["rewards/chosen"].mean(), u[y == 1].mean())
  record("kto", "rewards/rejected (group mean)", m["rewards/rejected"].mean(), u[y == 0].mean())
  np.testing.assert_array_equal(m["rewards/chosen"].weights, y == 1)   # summed per group
  _, m = losses.get("npo")(to_logps(b))   # NPO's rows are all undesirable, whatever the label
  record("npo", "rewards/rejected (all rows)", m["rewards/rejected"].mean(), u.mean())
  assert not np.asarray(m["rewards/chosen"].weights).any()
  _, m = losses.get("bco")(to_logps(b), delta=0.3, delta_count=10.0)
  record("bco", "delta metric", m["delta"], bco_delta(u, 0.3, 10.0))
  assert float(m["delta_count"]) == 10.0 + B
  b = make_batch(5, "wide")
  b64 = f64(b)
  _, m = losses.get("orpo")(to_logps(b, ref=False))
  record("orpo", "log_odds_chosen", m["log_odds_chosen"], orpo_log_odds(b64))
  _, m = losses.get("lcpo")(to_logps(b), eta=0.6, eta_momentum=0.8)
  w = lcpo_parts(b64, ref_dpo, {}, 0.6, "gibbs")[2]
  record("lcpo", "confidence w", m["lcpo/confidence"], w)
  record("lcpo", "eta_next", m["eta_next"], 0.8 * 0.6 + 0.2 * w.mean())
  _, m = losses.get("wpo")(to_logps(b))
  record("wpo", "weight", m["wpo/weight"], wpo_weight(b64))
  _, m = losses.get("mallows")(to_logps(b))
  record("mallows", "phi", m["mallows/phi"], -0.29 * np.log(b64["ent"]))
  _, m = losses.get("ld")(to_logps(b), ld_alpha=0.3)
  ld = ld_logps(b64, 0.3)
  record("ld", "ld_logps/chosen", m["ld_logps/chosen"], ld["pc"])
  record("ld", "ld_logps/rejected", m["ld_logps/rejected"], ld["pr"])
  assert np.abs(ld["pc"] - b64["pc"]).max() > 1e-2   # the weighting changed something


def test_dpo_lambda_is_sigmoid_weight():
  """λ = σ(β(r_l − r_w)), the Pre-DPO weight, and ½ at initialisation (policy == reference)."""
  b = make_batch(6, "wide")
  _, m = losses.get("dpo")(to_logps(b), beta=0.1)
  record("dpo", "lambda closed form", m["lambda"], sig(-0.1 * h_of(f64(b))))
  b["rc"], b["rr"] = b["pc"], b["pr"]
  _, m = losses.get("dpo")(to_logps(b))
  np.testing.assert_allclose(m["lambda"], 0.5)


def test_sft_batch_mean_is_token_mean():
  """normalize='batch': the batch mean equals −α Σ_tokens logp / #tokens, as TRL's sft term."""
  b = make_batch(7, "wide")
  loss, _ = losses.get("sft")(to_logps(b, ref=False), alpha=0.7)
  mask = np.arange(T)[None] < b["lw"][:, None]
  want = -0.7 * np.sum(np.where(mask, b["tpc"].astype(np.float64), 0.0)) / mask.sum()
  record("sft", "batch mean = token mean", np.mean(np.asarray(loss, np.float64)), want)


# ---------------------------------------------------------------------------------------------
# Registry, defaults, contract.
# ---------------------------------------------------------------------------------------------

LOSSES_MD_NAMES = ["dpo", "sigmoid", "cdpo", "robust", "ipo", "sigmoid_norm", "hinge", "exo_pair",
                   "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
                   "apo_down", "discopop", "dpop", "fdpo", "sft", "rpo", "simpo", "cpo", "orpo",
                   "kto", "bco", "npo", "wpo", "ld", "mallows", "lcpo", "dadpo"]
TRL_LOSS_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
                  "sigmoid_norm", "sft"]


def test_every_name_resolves():
  for name in LOSSES_MD_NAMES + TRL_LOSS_TYPES:
    assert isinstance(losses.get(name), losses.LossSpec), name
  assert losses.get("sigmoid") is losses.get("dpo")
  assert losses.get("rpo") is losses.get("sft")
  for case in CASES:  # every case ran against the function its name resolves to
    assert case.loss in losses.names()


def test_unknown_name_lists_known():
  with pytest.raises(KeyError) as err:
    losses.get("nope")
  msg = str(err.value)
  assert "nope" in msg and all(n in msg for n in ("dpo", "kto", "simpo", "aot"))
  with pytest.raises(KeyError):
    losses.get("dpo:0.5+nope")


EXPECTED_DEFAULTS = {
    "dpo": {"beta": 0.1}, "ipo": {"beta": 0.1}, "hinge": {"beta": 0.1},
    "sigmoid_norm": {"beta": 0.1},
    "exo_pair": {"label_smoothing": 1e-3}, "discopop": {"beta": 0.1, "tau": 0.05},
    "dpop": {"dpop_lambda": 50.0}, "simpo": {"beta": 2.0, "gamma": 0.5},
    "cpo": {"beta": 0.1, "alpha": 1.0}, "orpo": {"beta": 0.1},
    "kto": {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
    "npo": {"beta": 0.1}, "mallows": {"c": 0.29}, "aot": {"label_smoothing": 0.0},
    "fdpo": {"divergence": "reverse_kl"}, "sft": {"alpha": 1.0}, "bco_pair": {"use_delta": True},
    "wpo": {"base": "dpo"}, "lcpo": {"base": "dpo"}, "ld": {"base": "dpo"},
}


def test_hparam_defaults_match_losses_md():
  for name, expected in EXPECTED_DEFAULTS.items():
    got = losses.get(name).hparams
    for k, v in expected.items():
      assert got[k] == v, (name, k, got[k], v)


def test_registration_flags():
  for name in ("simpo", "cpo", "orpo", "sft"):
    assert not losses.get(name).needs_ref, name
  for name in ("kto", "bco", "npo"):
    assert losses.get(name).unpaired, name
  assert losses.get("wpo").token_stats == ("logsumsq",)
  assert losses.get("wpo").needs_tokens and losses.get("ld").needs_tokens
  assert set(losses.get("dadpo").extra_keys) == {"teacher_chosen", "teacher_rejected"}
  assert losses.get("mallows").extra_keys == ("ref_entropy",)
  for name in ("bco_pair", "bco", "lcpo"):
    assert losses.get(name).init_state(), name


def test_batch_coupled_flag_is_what_the_loss_does():
  """`batch_coupled` (the step then accumulates micro-batches through the whole batch's values)
  is set exactly on the losses whose per-pair loss changes when the batch is split in two."""
  halves = lambda lp, part: jax.tree.map(lambda x: x[:B // 2] if part == 0 else x[B // 2:], lp)
  coupled = {}
  for name in losses.names():
    spec = losses.get(name)
    lp = to_logps(make_batch(15, "wide", unpaired=spec.unpaired))
    whole = np.asarray(spec(lp)[0])
    split = np.concatenate([np.asarray(spec(halves(lp, i))[0]) for i in (0, 1)])
    coupled[name] = not np.allclose(whole, split, rtol=1e-6, atol=1e-6)
  assert {n for n, c in coupled.items() if c} == {"aot", "aot_unpaired", "kto", "bco", "bco_pair",
                                                  "sft", "rpo", "cpo", "orpo"}
  for name, c in coupled.items():
    assert losses.get(name).batch_coupled == c, name
  assert losses.get("wpo(aot)").batch_coupled and not losses.get("wpo(simpo)").batch_coupled
  assert losses.get("dpo:0.5+sft").batch_coupled and not losses.get("dpo+ipo").batch_coupled


DEFAULT_CASES = [c for c in CASES if c.test == "defaults" or c.loss == "fdpo"]


def _all_defaults(paired, unpaired):
  """Every default case's loss and ∇ of its mean w.r.t. the policy fields, in one program."""
  out = {}
  for case in DEFAULT_CASES:
    lp = unpaired if case.unpaired else paired
    if not case.needs_ref:
      lp = lp._replace(ref_chosen=None, ref_rejected=None, ref_chosen_tokens=None,
                       ref_rejected_tokens=None)
    fn = losses.get(case.loss)

    def mean_loss(pc, pr, tpc, tpr, lp=lp, fn=fn, case=case):
      lp = lp._replace(policy_chosen=pc, policy_rejected=pr, policy_chosen_tokens=tpc,
                       policy_rejected_tokens=tpr)
      loss = fn(lp, **case.hp)[0]
      return jnp.mean(loss), loss

    argnums = (0, 1, 2, 3) if losses.get(case.loss).needs_tokens else (0, 1)
    (_, loss), grads = jax.value_and_grad(mean_loss, argnums=argnums, has_aux=True)(
        lp.policy_chosen, lp.policy_rejected, lp.policy_chosen_tokens, lp.policy_rejected_tokens)
    out[case.id] = (loss, grads)
  return out


_all_defaults_jit = jax.jit(_all_defaults)


@pytest.mark.parametrize("scale", ["wide", "large"])
def test_jit_and_grads_finite(scale):
  """All losses under one jax.jit: values match NumPy, gradients are finite (and nonzero).

  The "large" batch has |h| up to ~2e4 and rows with S = −1e6, where naive exponentials overflow.
  """
  bp, bu = make_batch(11, scale), make_batch(11, scale, unpaired=True)
  out = _all_defaults_jit(to_logps(bp), to_logps(bu))
  for case in DEFAULT_CASES:
    loss, grads = out[case.id]
    b64 = f64(bu if case.unpaired else bp)
    hp = case.ref_hp if case.ref_hp is not None else case.hp
    record(case.loss, f"under jit ({scale})", loss, case.ref(b64, **hp), *TOL[scale])
    for g in grads:
      assert np.all(np.isfinite(np.asarray(g))), case.id
    if scale == "wide":  # the loss depends on θ (at "large" WPO's weights underflow to 0)
      assert any(np.any(np.asarray(g) != 0) for g in grads), case.id


def test_orpo_stable_near_zero_logprob():
  b = make_batch(12, "normal")
  b["pc"] = np.full(B, -1e-9, np.float32)  # m_w → 0: log(1 − e^{m}) → −inf naively
  loss, _ = losses.get("orpo")(to_logps(b, ref=False))
  g = jax.grad(lambda pc: jnp.mean(losses.get("orpo")(to_logps(b, ref=False)._replace(
      policy_chosen=pc))[0]))(jnp.asarray(b["pc"]))
  assert np.all(np.isfinite(loss)) and np.all(np.isfinite(g))


def test_reference_free_losses_ignore_ref_fields():
  b = make_batch(13, "wide")
  for name in ("simpo", "cpo", "orpo", "sft"):
    with_ref, _ = losses.get(name)(to_logps(b, ref=True))
    without, _ = losses.get(name)(to_logps(b, ref=False))
    np.testing.assert_array_equal(with_ref, without)


def test_validation_errors():
  logps = to_logps(make_batch(14))
  with pytest.raises(ValueError):
    losses.get("robust")(logps, label_smoothing=0.5)
  with pytest.raises(ValueError):
    losses.get("exo_pair")(logps, label_smoothing=0.0)
  with pytest.raises(ValueError):
    losses.get("fdpo")(logps, divergence="hellinger")
  with pytest.raises(ValueError):
    losses.get("lcpo")(logps, base="kto")
  with pytest.raises(ValueError):
    losses.get("lcpo")(logps, base="bco_pair")


def test_wrapper_specs_follow_base():
  spec = losses.wpo_spec("simpo")
  assert spec is losses.get("wpo(simpo)")
  assert not spec.needs_ref and spec.needs_tokens
  assert spec.hparams["base"] == "simpo"
  b = make_batch(15, "wide")
  loss, _ = spec(to_logps(b, ref=False))
  record("wpo", "wpo_spec(simpo)", loss, ref_simpo(f64(b)) * wpo_weight(f64(b)))
  spec = losses.lcpo_spec("simpo", eta0=0.75)
  assert not spec.needs_ref and float(spec.init_state()["eta"]) == 0.75
  loss, _ = spec(to_logps(b, ref=False), eta=0.75)
  record("lcpo", "lcpo_spec(simpo)", loss, ref_lcpo(f64(b), eta=0.75, base_ref=ref_simpo))


def main():
  """Run the value checks (and the batch / state ones) and print the deviation table.

  `python tests/test_losses.py [--summary]`: every (loss, test), or one row per kind of test.
  """
  import test_losses_state  # pylint: disable=g-import-not-at-top
  for case in CASES:
    for scale in SCALES:
      check_case(case, SEEDS, scale)
  for name in PAIR_REF_LOSSES:
    test_reward_metrics(name)
  test_special_metrics()
  test_dpo_lambda_is_sigmoid_weight()
  test_sft_batch_mean_is_token_mean()
  test_wrapper_specs_follow_base()
  for scale in ("wide", "large"):
    test_jit_and_grads_finite(scale)
  test_losses_state.run_all()
  DEVIATIONS.update(test_losses_state.DEVIATIONS)
  print(deviation_table(summary="--summary" in sys.argv))


if __name__ == "__main__":
  main()
