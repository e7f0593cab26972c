"""Weighted sums of registered losses, e.g. MPO (Wang et al., 2024, arXiv 2411.10442).

    spec = losses.combine({"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0})
    spec = losses.get("sigmoid:0.8+bco_pair:0.2+sft:1.0")       # the same

Name syntax: terms joined by "+", each "name" or "name:weight" (weight defaults to 1; spaces
ignored; each name at most once). TRL main's loss_type=[...] with loss_weights=[...] is the same
sum of per-example losses.

- hparams: each term receives the hyperparameters its signature accepts (so beta=0.2 reaches
  every term that has a beta); one that no term accepts is a TypeError. "<term>/<name>" sets one
  term's hyperparameter only (e.g. "simpo/beta"). A name whose defaults differ between terms
  (simpo's beta 2.0, cpo's 0.1) is listed in `hparams` with default None: None (or leaving it
  out) keeps each term's own default.
- state: a stateful term's state is namespaced "<term>/<key>" (e.g. "bco_pair/delta") in
  init_state, in the hparams the combined loss accepts, and in update_state.
- metrics: every term's metrics prefixed "<term>/" plus "<term>/loss" (unweighted), and the
  unprefixed reward metrics (rewards/*, lambda) of the first term.
- needs_ref / needs_tokens: OR over terms; token_stats, extra_keys: union. Terms must agree on
  unpaired.
"""
from __future__ import annotations

import functools
import inspect

from dpo_jax.losses import core

_REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "lambda")


def _canonical(weights: dict[str, float]) -> str:
  return "+".join(f"{k}:{float(v):g}" for k, v in weights.items())


def combine(weights: dict[str, float]) -> core.LossSpec:
  """A LossSpec computing Σ_k weight_k · loss_k (per example); see the module doc."""
  if not weights:
    raise ValueError("combine needs at least one term")
  specs = {name: core.get(name) for name in weights}
  if len({s.unpaired for s in specs.values()}) > 1:
    raise ValueError(f"cannot mix paired and unpaired losses: {list(weights)}")
  stateful = {name: s for name, s in specs.items() if s.init_state()}
  first = next(iter(weights))

  # Advertise the union of the terms' hyperparameters for LossSpec.hparams (state excluded).
  defaults = {}
  for s in specs.values():
    for k, v in s.hparams.items():
      defaults.setdefault(k, []).append(v)
  conflicting = {k for k, vs in defaults.items() if any(v != vs[0] for v in vs)}
  # `training` (see LossSpec.at_eval) reaches the terms that take it.
  training = [k for s in specs.values() for k in core.accepted_hparams(s, {"training": 1})][:1]

  def fn(logps: core.PairLogps, **hparams):
    state_keys = {k for k in hparams if "/" in k}
    plain = {k: v for k, v in hparams.items()
             if k not in state_keys and not (k in conflicting and v is None)}
    unused = set(plain)
    total, metrics = 0.0, {}
    for name, weight in weights.items():
      spec = specs[name]
      accepted = core.accepted_hparams(spec, plain)
      unused -= accepted
      kwargs = {k: plain[k] for k in accepted}
      prefix = name + "/"
      kwargs.update({k[len(prefix):]: v for k, v in hparams.items() if k.startswith(prefix)})
      loss, term_metrics = spec(logps, **kwargs)
      total = total + weight * loss
      metrics[prefix + "loss"] = loss
      metrics.update({prefix + k: v for k, v in term_metrics.items()})
      if name == first:
        metrics.update({k: term_metrics[k] for k in _REWARD_KEYS if k in term_metrics})
    unknown_state = {k for k in state_keys if k.split("/", 1)[0] not in weights}
    if unused or unknown_state:
      raise TypeError(f"no term of {list(weights)} accepts {sorted(unused | unknown_state)}")
    return total, metrics

  def init_state() -> dict:
    return {f"{name}/{k}": v for name, s in stateful.items() for k, v in s.init_state().items()}

  def update_state(state: dict, metrics: dict) -> dict:
    new = {}
    for name, s in stateful.items():
      prefix = name + "/"
      sub_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
      sub_metrics = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
      new.update({prefix + k: v for k, v in s.update_state(sub_state, sub_metrics).items()})
    return new

  fn.__doc__ = f"Weighted sum {_canonical(weights)}."
  kw = inspect.Parameter.KEYWORD_ONLY
  fn.__signature__ = inspect.Signature(
      [inspect.Parameter("logps", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
      + [inspect.Parameter(k, kw, default=None if k in conflicting else vs[0])
         for k, vs in defaults.items()]
      + [inspect.Parameter(k, kw, default=True) for k in training])
  return core.LossSpec(
      name=_canonical(weights), fn=fn,
      needs_ref=any(s.needs_ref for s in specs.values()),
      unpaired=next(iter(specs.values())).unpaired,
      token_stats=tuple(dict.fromkeys(t for s in specs.values() for t in s.token_stats)),
      init_state=init_state, update_state=update_state,
      needs_tokens=any(s.needs_tokens for s in specs.values()),
      batch_coupled=any(s.batch_coupled for s in specs.values()),
      extra_keys=tuple(dict.fromkeys(t for s in specs.values() for t in s.extra_keys)))


@functools.lru_cache(maxsize=None)
def parse(name: str) -> core.LossSpec:
  """"a:0.8+b:0.2+c" -> combine({"a": 0.8, "b": 0.2, "c": 1.0}); cached, so one spec per name."""
  weights = {}
  for term in name.replace(" ", "").split("+"):
    key, sep, weight = term.partition(":")
    if not key or (sep and not weight):
      raise KeyError(f"cannot parse loss {name!r}: expected 'name[:weight]+name[:weight]...'")
    if key in weights:
      raise KeyError(f"loss {key!r} appears twice in {name!r}")
    try:
      weights[key] = float(weight) if sep else 1.0
    except ValueError:
      raise KeyError(f"cannot parse weight {weight!r} in loss {name!r}") from None
  return combine(weights)
