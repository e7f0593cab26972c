"""The loss contract: `PairLogps` in, per-example loss and metrics out.

    fn = losses.get("dpo")
    loss_B, metrics = fn(logps, **hparams)

A loss is a pure function of summed log-probabilities (never of a model). It returns a per-example
loss [B] and a dict of metrics; each metric is per-example [B], a scalar, or a `GroupMean` (a
per-example metric averaged over some of the rows). The train step is the one place that
averages. Registration records what the step must provide:

  needs_ref:   the loss reads ref_chosen / ref_rejected (False lets reference='none' skip the
               reference forward entirely).
  unpaired:    rows are {prompt, completion, label} (KTO, BCO, NPO) instead of pairs.
  token_stats: per-token statistics beyond log-probs the step must compute into logps.extra
               ("logsumsq" for WPO: extra["policy_{chosen,rejected}_logsumsq"] [B, T] =
               log Σ_v p_v²; "ref_entropy" for Mallows: extra["ref_entropy"] [B]).
  needs_tokens: the loss reads the per-token fields (policy_chosen_tokens, ...; LD, WPO).
  extra_keys:  keys of `logps.extra` the loss reads (teacher log-probs, WPO's log Σp², ...).
  batch_coupled: a pair's loss depends on the other pairs of the batch (AOT's sort, KTO's z0,
               BCO's δ, a batch token-mean NLL). With gradient accumulation the step then
               computes these over the whole batch, not per micro-batch (one more policy
               forward per step; train.make_train_step).
  init_state / update_state: loss state carried in the train state (BCO's δ, LCPO's η). The state
               enters the loss as keyword hyperparameters and `update_state(state, metrics)`
               computes the next one from the step's averaged metrics.

Metrics: TRL's names (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins) and
"lambda", the gradient weight: ½(|∂L/∂S_θ(y_w)| + |∂L/∂S_θ(y_l)|)/β for reference-based pair losses
(= σ(β(r_l − r_w)) for DPO; |y|/β instead of 1/β for length-normalised ones), |∂L/∂S_θ(y)|/β for
unpaired ones, σ(−z) of the preference logit z for reference-free ones. Each module says which.

Names: `get` also accepts weighted sums, "sigmoid:0.8+bco_pair:0.2+sft:1.0" (see combine.py).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

Array = jax.Array


class PairLogps(NamedTuple):
  """Summed completion log-probs of one batch, [B] each.

  For unpaired losses the `chosen` slots hold the completion and the `rejected` slots hold the
  mismatched completion (x_i, y_{i+1}) used for KTO's KL reference point; `label` is 1 for
  desirable rows.
  """
  policy_chosen: Array
  policy_rejected: Array
  ref_chosen: Optional[Array] = None
  ref_rejected: Optional[Array] = None
  chosen_len: Optional[Array] = None
  rejected_len: Optional[Array] = None
  label: Optional[Array] = None
  # Per-token fields [B, T], completion tokens left-aligned, zero beyond the length.
  policy_chosen_tokens: Optional[Array] = None
  policy_rejected_tokens: Optional[Array] = None
  ref_chosen_tokens: Optional[Array] = None
  ref_rejected_tokens: Optional[Array] = None
  # Extra per-example or per-token statistics requested by `token_stats` (name -> array).
  extra: Optional[dict] = None
  # [B] 1.0 for real rows, 0.0 for padding rows. Batch-level statistics (AOT's sort, KTO's z0,
  # BCO's δ, batch token-mean NLL, LCPO's η) skip padding; the step still masks the loss.
  valid: Optional[Array] = None


@dataclasses.dataclass(frozen=True)
class LossSpec:
  name: str
  fn: Callable[..., tuple[Array, dict]]
  needs_ref: bool = True
  unpaired: bool = False
  token_stats: tuple[str, ...] = ()
  init_state: Callable[[], dict] = dict
  update_state: Callable[[dict, dict], dict] = lambda state, metrics: state
  aliases: tuple[str, ...] = ()
  needs_tokens: bool = False
  extra_keys: tuple[str, ...] = ()
  batch_coupled: bool = False

  def __call__(self, logps: PairLogps, **hparams) -> tuple[Array, dict]:
    return self.fn(logps, **hparams)

  @property
  def hparams(self) -> dict[str, Any]:
    """Keyword hyperparameters and their defaults (a wrapper's include its base loss's).

    Loss state (the keys of init_state(), e.g. BCO's delta) is not a hyperparameter: the step
    passes it separately. Nor is `training` (see at_eval).
    """
    params = inspect.signature(self.fn).parameters
    out = {}
    if "base" in params and any(p.kind == p.VAR_KEYWORD for p in params.values()):
      out.update(get(params["base"].default).hparams)
    out.update({k: p.default for k, p in params.items() if p.kind == p.KEYWORD_ONLY})
    for k in (*self.init_state(), "training"):
      out.pop(k, None)
    return out

  def at_eval(self, loss_state: dict) -> dict:
    """The keywords beside the hyperparameters that an evaluation passes: the loss state, and
    training=False to a loss that takes `training` (BCO: δ is the stored running mean, not
    updated with the evaluated batch, as TRL evaluates). Training passes the state alone."""
    return {**loss_state, **{k: False for k in accepted_hparams(self, {"training": False})}}


_REGISTRY: dict[str, LossSpec] = {}


def register(name: str, *, aliases: tuple[str, ...] = (), needs_ref: bool = True,
             unpaired: bool = False, token_stats: tuple[str, ...] = (),
             init_state: Callable[[], dict] = dict,
             update_state: Callable[[dict, dict], dict] | None = None,
             needs_tokens: bool = False, extra_keys: tuple[str, ...] = (),
             batch_coupled: bool = False):
  """Decorator: registers `fn(logps, **hparams) -> (loss_B, metrics)` under `name`."""
  def deco(fn):
    spec = LossSpec(name=name, fn=fn, needs_ref=needs_ref, unpaired=unpaired,
                    token_stats=tuple(token_stats), init_state=init_state,
                    update_state=update_state or (lambda state, metrics: state),
                    aliases=tuple(aliases), needs_tokens=needs_tokens,
                    extra_keys=tuple(extra_keys), batch_coupled=batch_coupled)
    for key in (name, *aliases):
      if key in _REGISTRY and _REGISTRY[key].fn is not fn:
        raise ValueError(f"loss name {key!r} is already registered")
      _REGISTRY[key] = spec
    return spec
  return deco


def get(name: str) -> LossSpec:
  """The loss registered as `name`; a wrapper over a base, "wpo(simpo)" (see `with_base`); or a
  weighted sum "a:0.8+b:0.2+c" (see combine.py)."""
  if name in _REGISTRY:
    return _REGISTRY[name]
  if "+" in name or ":" in name:
    # The package re-exports the function `combine`, so fetch the module itself.
    return importlib.import_module("dpo_jax.losses.combine").parse(name)
  if name.endswith(")") and "(" in name:
    outer, inner = name[:-1].split("(", 1)
    return _with_base_cached(outer.strip(), inner.strip())
  raise KeyError(f"unknown loss {name!r}; known losses: {', '.join(names())}")


def names() -> list[str]:
  return sorted(_REGISTRY)


def _is_wrapper(spec: LossSpec) -> bool:
  params = inspect.signature(spec.fn).parameters
  return "base" in params and any(p.kind == p.VAR_KEYWORD for p in params.values())


def with_base(wrapper: str | LossSpec, base: str) -> LossSpec:
  """A wrapper loss (wpo, lcpo, ld) bound to `base`: "wpo(simpo)" names the same spec.

  The bound spec reads the base's flags (needs_ref, token_stats, extra_keys, batch_coupled) and
  hparams, and carries the base's loss state unless the wrapper has its own (LCPO's η; it then
  refuses a stateful base).
  """
  spec = get(wrapper) if isinstance(wrapper, str) else wrapper
  if not _is_wrapper(spec):
    raise KeyError(f"{spec.name!r} takes no base loss; wrappers: "
                   f"{', '.join(n for n in names() if _is_wrapper(_REGISTRY[n]))}")
  b = get(base)
  if b.unpaired:
    raise ValueError(f"{base!r} is unpaired; {spec.name} needs a pair loss")
  own_state = bool(spec.init_state())
  if own_state and b.init_state():
    raise ValueError(f"{spec.name} has its own state and cannot wrap the stateful {base!r}")
  union = lambda a, c: tuple(dict.fromkeys(a + c))
  return dataclasses.replace(
      spec, name=f"{spec.name}({b.name})", fn=functools.partial(spec.fn, base=base), aliases=(),
      needs_ref=b.needs_ref, needs_tokens=spec.needs_tokens or b.needs_tokens,
      token_stats=union(spec.token_stats, b.token_stats),
      extra_keys=union(spec.extra_keys, b.extra_keys),
      batch_coupled=spec.batch_coupled or b.batch_coupled,
      init_state=spec.init_state if own_state else b.init_state,
      update_state=spec.update_state if own_state else b.update_state)


@functools.lru_cache(maxsize=None)
def _with_base_cached(wrapper: str, base: str) -> LossSpec:
  return with_base(wrapper, base)


# ---------------------------------------------------------------------------------------------
# Shared pieces for loss functions.
# ---------------------------------------------------------------------------------------------


def log_sigmoid(x: Array) -> Array:
  """log σ(x), stable for large |x| (= −softplus(−x))."""
  return jax.nn.log_sigmoid(x)


def rewards(logps: PairLogps, beta) -> tuple[Array, Array]:
  """β·(log π − log π_ref) for chosen and rejected."""
  return (beta * (logps.policy_chosen - logps.ref_chosen),
          beta * (logps.policy_rejected - logps.ref_rejected))


def reward_metrics(chosen_rewards: Array, rejected_rewards: Array, grad_weight: Array) -> dict:
  """TRL's reward metrics (per example) plus the DPO-style gradient weight λ."""
  chosen_rewards = jax.lax.stop_gradient(chosen_rewards)
  rejected_rewards = jax.lax.stop_gradient(rejected_rewards)
  return {
      "rewards/chosen": chosen_rewards,
      "rewards/rejected": rejected_rewards,
      "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
      "rewards/margins": chosen_rewards - rejected_rewards,
      "lambda": jax.lax.stop_gradient(grad_weight),
  }


class GroupMean(NamedTuple):
  """A metric over some of the rows: Σ values·weights / Σ weights ([B] each).

  The train step sums numerator and denominator over micro-batches and eval batches before it
  divides, so the mean is that of all the rows in the group whatever the batching (a per-batch
  mean, as a scalar, would weigh a batch with one such row as much as one with many)."""
  values: Array
  weights: Array

  def mean(self) -> Array:
    return weighted_mean(self.values, self.weights)


def unpaired_reward_metrics(rewards: Array, label: Array, grad_weight: Array,
                            weights: Optional[Array] = None) -> dict:
  """Reward metrics for unpaired rows: means over the desirable ("chosen") and undesirable
  ("rejected") rows, as GroupMeans. The step also groups logps/* and logits/* by them, and logs
  rewards/margins = chosen − rejected of the means (TRL KTOTrainer's metrics)."""
  rewards = jax.lax.stop_gradient(rewards)
  label = label.astype(rewards.dtype)
  weights = jnp.ones_like(rewards) if weights is None else weights
  return {
      "rewards/chosen": GroupMean(rewards, label * weights),
      "rewards/rejected": GroupMean(rewards, (1.0 - label) * weights),
      "lambda": jax.lax.stop_gradient(grad_weight),
  }


def grad_weight(loss_fn: Callable[..., Array], xs: tuple[Array, ...],
                scales: tuple[Any, ...]) -> Array:
  """λ = mean_k |∂ Σ_i loss_i / ∂ x_k| · scale_k, per example, with no gradient flowing back.

  `loss_fn(*xs)` returns the per-example loss [B] as a function of per-example inputs (the policy
  log-probs); the sum's gradient is per example because each row only touches its own loss
  (for sorted / batch-level losses it routes through the sort). With xs = (S_θ(y_w), S_θ(y_l)) and
  scales 1/β this is σ(−βh) for DPO, the weight Pre-DPO (arXiv 2504.15843) calls λ.
  """
  xs = tuple(jax.lax.stop_gradient(x) for x in xs)
  grads = jax.grad(lambda *a: jnp.sum(loss_fn(*a)), argnums=tuple(range(len(xs))))(*xs)
  total = sum(jnp.abs(g) * s for g, s in zip(grads, scales))
  return jax.lax.stop_gradient(total / len(xs))


def log1mexp(x: Array) -> Array:
  """log(1 − e^x) for x < 0, stable at both ends and with finite gradients (Mächler 2012)."""
  x = jnp.minimum(x, -1e-7)  # log(1 − e^0) = −inf; clamp just below 0
  near = x > -jnp.log(2.0)
  # Each branch sees only inputs where it is accurate, so the unused branch stays finite.
  x_near = jnp.where(near, x, -1.0)
  x_far = jnp.where(near, -1.0, x)
  return jnp.where(near, jnp.log(-jnp.expm1(x_near)), jnp.log1p(-jnp.exp(x_far)))


def clamped_exp(x: Array, max_exponent: float = 50.0) -> Array:
  """e^x with the exponent clamped from above, so that products with it stay finite in f32."""
  return jnp.exp(jnp.minimum(x, max_exponent))


def lengths(length: Optional[Array], dtype=jnp.float32) -> Array:
  """Completion token counts as floats, at least 1 (TRL clamps the same way)."""
  if length is None:
    raise ValueError("this loss needs chosen_len / rejected_len")
  return jnp.maximum(length.astype(dtype), 1.0)


def token_mask(tokens: Array, length: Array) -> Array:
  """[B, T] mask of valid completion tokens: position k is valid iff k < length."""
  return jnp.arange(tokens.shape[1])[None, :] < length[:, None]


def row_weights(logps: PairLogps) -> Array:
  """[B] weights of real rows: logps.valid, or all ones."""
  if logps.valid is None:
    return jnp.ones_like(logps.policy_chosen, dtype=jnp.float32)
  return jax.lax.stop_gradient(logps.valid).astype(jnp.float32)


def weighted_mean(x: Array, w: Array) -> Array:
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1e-9)


def chosen_nll(logps: PairLogps, normalize: str = "batch") -> Array:
  """Per-example NLL of the chosen completion, token-averaged.

  normalize="batch": −S_i · n / Σ_j |y_j| (n real rows), whose mean over the real rows is the
  token-mean cross-entropy over all chosen tokens of the (global) batch, as TRL's sft / RPO / CPO
  / ORPO terms compute it. normalize="example": −S_i / |y_i|, each example's own token mean.
  """
  if normalize == "batch":
    w = row_weights(logps)
    total = jnp.maximum(jnp.sum(w * logps.chosen_len.astype(jnp.float32)), 1.0)
    return -logps.policy_chosen * (jnp.sum(w) / total)
  if normalize == "example":
    return -logps.policy_chosen / lengths(logps.chosen_len)
  raise ValueError(f"normalize must be 'batch' or 'example', got {normalize!r}")


def running_mean(values: Array, mean: Array, count: Array,
                 weights: Optional[Array] = None) -> tuple[Array, Array]:
  """Count-weighted running mean of every value seen, `values` included (rows with weight 0,
  i.e. padding, are not seen); no gradient. Returns (new mean, new count)."""
  values = jax.lax.stop_gradient(values).astype(jnp.float32)
  weights = jnp.ones_like(values) if weights is None else weights.astype(jnp.float32)
  n = jnp.sum(weights)
  new_count = jnp.asarray(count, jnp.float32) + n
  batch_mean = jnp.sum(values * weights) / jnp.maximum(n, 1e-9)
  new_mean = mean + (batch_mean - mean) * (n / jnp.maximum(new_count, 1e-9))
  return new_mean, new_count


def _swap_key(key: str) -> str:
  return key.replace("chosen", "\0").replace("rejected", "chosen").replace("\0", "rejected")


def swap_pair(logps: PairLogps) -> PairLogps:
  """The same batch with chosen and rejected exchanged (extra keys naming them are swapped too)."""
  extra = None if logps.extra is None else {_swap_key(k): v for k, v in logps.extra.items()}
  return logps._replace(
      policy_chosen=logps.policy_rejected, policy_rejected=logps.policy_chosen,
      ref_chosen=logps.ref_rejected, ref_rejected=logps.ref_chosen,
      chosen_len=logps.rejected_len, rejected_len=logps.chosen_len,
      policy_chosen_tokens=logps.policy_rejected_tokens,
      policy_rejected_tokens=logps.policy_chosen_tokens,
      ref_chosen_tokens=logps.ref_rejected_tokens, ref_rejected_tokens=logps.ref_chosen_tokens,
      extra=extra)


def accepted_hparams(spec: LossSpec, hparams: dict) -> set[str]:
  """Names in `hparams` that `spec` accepts (wrappers accept their base loss's names too)."""
  params = inspect.signature(spec.fn).parameters
  own = {k for k, p in params.items() if p.kind == p.KEYWORD_ONLY}
  if any(p.kind == p.VAR_KEYWORD for p in params.values()) and "base" in params:
    base = get(hparams.get("base", params["base"].default))
    own |= accepted_hparams(base, hparams)
  return own & set(hparams)
