"""Reference modes: where r(y) = log π(y) − log π_ref(y) gets its second term.

Each mode is a `Reference` built once: the step calls `ref.logps_fn(ref.params, batch)` the same
way for every mode, so nothing branches inside the step. A reference forward runs under
stop_gradient: no activations are kept for the backward pass.

  initial      the starting policy (a frozen copy of the initial params)
  checkpoint   any dpo_jax Orbax checkpoint or Hugging Face directory (Pre-DPO's guide)
  none         reference-free losses (SimPO, CPO, ORPO): no reference forward at all
  precomputed  one pass writes the reference's summed log-probs of every example to
               W/ref_cache/<split>-<fingerprint>.npz, keyed by a fingerprint of the tokenised
               data and of the reference weights; batches then carry them and the step runs no
               reference forward (the reference params are dropped after the pass). The
               reference is reference.path if set, else the initial policy.
  sync         TR-DPO (Gorbatovski et al., 2024): every τ = reference.sync_every steps,
               ref ← α·θ + (1 − α)·ref with α = reference.sync_alpha. The copy starts as
               reference.path if set, else the initial policy; it is training state: saved
               with each checkpoint and restored on resume.
A reference.path that the mode would ignore (initial, none) is refused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import sharding, writers
from dpo_jax.data import preference
from dpo_jax.models import core, load, logprobs
from dpo_jax.models.config import check_dtype

MODES = ("initial", "checkpoint", "none", "precomputed", "sync")


def no_columns(examples, split) -> dict:
  """Reference.columns and Teacher.columns once the precomputed passes are done (their closures
  hold the frozen weights, which are then released)."""
  del examples, split
  return {}


@dataclasses.dataclass
class Reference:
  mode: str
  params: Any                                   # None when no reference forward runs
  logps_fn: Callable[[Any, dict], Optional[dict]]
  # Per-example columns to attach to batches (precomputed): examples, split -> {name: [N, 2]}.
  columns: Callable[[list, str], dict] = no_columns
  update: Optional[Callable[[Any, Any], Any]] = None   # sync: (ref, policy) -> new ref
  every: int = 0
  saved: bool = False                           # part of the checkpointed training state


def build(mode: str, ref_cfg, spec, cfg, init_params, mesh, rules, *, chunk: int,
          stats: tuple[str, ...] = (), tokens: bool = False, workdir: str | None = None,
          batch_size: int = 16, buckets=(), pad_id: int = 0, tokenizer=None) -> Reference:
  """ref_cfg is config.reference (mode, path, dtype, sync_every, sync_alpha); `tokenizer`, the
  policy's, is checked against a reference.path's own (see check_tokenizer)."""
  if mode not in MODES:
    raise ValueError(f"config.reference.mode must be one of {MODES}, got {mode!r}")
  check_dtype(ref_cfg.dtype, "config.reference.dtype")
  if mode == "none":
    if ref_cfg.path:
      raise ValueError(f"config.reference.path={ref_cfg.path} is set but "
                       "config.reference.mode='none' runs no reference")
    if spec.needs_ref:
      raise ValueError(f"config.loss.name={spec.name!r} needs a reference model but "
                       "config.reference.mode='none'")
    return Reference(mode, None, lambda ref_params, batch: None)

  graphdef = core.split(cfg)[0]

  def forward(ref_params, batch):
    model = core.merge(graphdef, ref_params)
    return jax.lax.stop_gradient(
        logprobs.sequence_logps(model, batch, chunk=chunk, stats=stats, tokens=tokens))

  path = ref_cfg.path
  if mode == "checkpoint" and not path:
    raise ValueError("config.reference.path is required with config.reference.mode="
                     "'checkpoint'")
  if mode == "initial" and path:
    raise ValueError(f"config.reference.path={path} is set but config.reference.mode='initial' "
                     "uses the initial policy; set mode='checkpoint' (or clear the path)")
  if path and tokenizer is not None and has_tokenizer(path):
    check_tokenizer(load.load_tokenizer(path), tokenizer, f"config.reference.path={path}")
  params = _load(path, cfg, init_params, mesh, rules, ref_cfg.dtype)
  if mode in ("initial", "checkpoint"):
    return Reference(mode, params, forward)
  if mode == "sync":
    alpha = ref_cfg.sync_alpha

    def update(ref, policy):
      return jax.tree.map(lambda r, p: (alpha * p + (1 - alpha) * r).astype(r.dtype), ref,
                          policy)
    return Reference(mode, params, forward, update=jax.jit(update, donate_argnums=0),
                     every=ref_cfg.sync_every, saved=True)

  # precomputed
  if spec.unpaired:
    raise ValueError(f"config.reference.mode='precomputed' cannot serve unpaired loss "
                     f"{spec.name!r}: its mismatched pairs are formed per batch")
  if tokens:
    raise ValueError(f"config.reference.mode='precomputed' caches summed log-probs, but loss "
                     f"{spec.name!r} needs per-token reference values; use 'initial'")
  if workdir is None:
    raise ValueError("config.reference.mode='precomputed' needs a workdir for its cache")
  columns = cached_columns("ref", graphdef, params, mesh, rules, chunk=chunk, stats=stats,
                           workdir=workdir, batch_size=batch_size, buckets=buckets,
                           pad_id=pad_id, extra=(forward_key(cfg), ref_cfg.dtype))

  def cached(ref_params, batch):
    del ref_params
    out = {"logps": batch["ref_logps"], "lens": None}
    out.update({s: batch[f"ref_{s}"] for s in stats})
    return out

  return Reference(mode, None, cached, columns=columns)


def has_tokenizer(path: str) -> bool:
  """Whether a model source holds a tokenizer: a dpo_jax workdir always does (W/tokenizer), a
  Hugging Face directory when it has tokenizer files."""
  names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
  path = load.local(path)
  return not load.hf_io.is_hf_dir(path) or any(os.path.exists(os.path.join(path, n))
                                               for n in names)


def check_tokenizer(model_tokenizer, policy_tokenizer, where: str):
  """A frozen model (reference, teacher; `where` names its setting) reads the policy's token
  ids, so both tokenizers must encode text alike (an equal vocabulary size is not enough: Llama
  2 and Mistral 7B both have 32,000 tokens)."""
  if not preference.same_encoding(model_tokenizer, policy_tokenizer):
    raise ValueError(f"{where}: its tokenizer encodes text differently from the policy's "
                     "(ids or BOS/EOS differ); it reads the policy's token ids, so it needs the "
                     "policy's tokenizer")


def _load(path, cfg, init_params, mesh, rules, dtype):
  if path:
    ref_cfg = load.model_config(path, cfg, **load.numerics(cfg))
    if diff := ref_cfg.architecture_diff(cfg):
      raise ValueError(f"config.reference.path={path}: its architecture differs from the "
                       f"policy's (reference vs policy): {diff}")
    params = load.load_params(path, cfg, mesh, rules)
  else:
    params = init_params
  # Always a copy (the policy's buffers are donated to the step), optionally in bf16.
  return jax.jit(lambda p: jax.tree.map(lambda x: jnp.array(x, dtype=dtype, copy=True), p))(
      params)


# ---------------------------------------------------------------------------------------------
# The precomputed cache
# ---------------------------------------------------------------------------------------------


def fingerprint_examples(examples) -> str:
  """A hash of every example's ids and label (each part as int64 bytes, then "|")."""
  ex = preference.Examples.of(examples)
  h = hashlib.sha256()
  for (lp, lc, lr), at, label in zip(ex.lens.tolist(), ex.starts.tolist(), ex.labels.tolist()):
    ids = ex.tokens[at:at + lp + lc + max(lr, 0)].astype(np.int64)   # one example at a time
    cuts = (0, lp, lp + lc, ids.size)
    for a, b in zip(cuts, cuts[1:]):
      h.update(ids[a:b].tobytes())
      h.update(b"|")
    h.update(np.int64(int(label * 2)).tobytes())
    h.update(b"|")
  return h.hexdigest()


def fingerprint_params(params, extra=()) -> str:
  """A hash of every weight (gathered one leaf at a time) and of how they are used."""
  h = hashlib.sha256(repr(extra).encode())
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(sharding.to_host(x).tobytes())
  return h.hexdigest()


def forward_key(cfg) -> tuple:
  """cfg.architecture() less what cannot change a forward pass's values: remat (what a
  backward pass keeps) and param_dtype (the weights themselves are hashed). A cache survives a
  change of them; other numerics (dtype, scan_layers, chunks) may round differently."""
  return tuple(kv for kv in cfg.architecture() if kv[0] not in ("remat", "param_dtype"))


def cached_columns(prefix: str, graphdef, params, mesh, rules, *, chunk: int, stats=(),
                   workdir: str, batch_size: int, buckets, pad_id: int, extra=()):
  """A function (examples, split) -> {"<prefix>_logps": [N, 2], "<prefix>_<stat>": [N, 2]}
  that computes a frozen model's summed log-probs of every example once and keeps them in
  W/<prefix>_cache/<split>-<fingerprint>.npz, keyed by the tokenised examples and the weights.
  """
  weights_key = fingerprint_params(params, extra=(chunk,) + tuple(stats) + tuple(extra))
  score = _scorer(graphdef, chunk, tuple(stats))

  def columns(examples, split):
    key = hashlib.sha256((weights_key + fingerprint_examples(examples)).encode()).hexdigest()
    path = os.path.join(workdir, f"{prefix}_cache", f"{split}-{key[:20]}.npz")
    cols = writers.read_npz(path)
    if cols is not None:
      return cols
    cols = _precompute(score, params, examples, mesh, rules, batch_size, buckets, pad_id,
                       stats, prefix)
    writers.write_npz(path, cols)   # a kill mid-write never leaves a cache that looks complete
    return cols
  return columns


def _scorer(graphdef, chunk, stats):
  @jax.jit
  def score(params, batch):
    out = logprobs.sequence_logps(core.merge(graphdef, params), batch, chunk=chunk, stats=stats)
    return {k: out[k] for k in ("logps", *stats)}
  return score


def _precompute(score, params, examples, mesh, rules, batch_size, buckets, pad_id, stats,
                prefix):
  from dpo_jax import evaluate   # noqa: PLC0415 (evaluate imports models too)
  out = evaluate.map_batches(lambda batch: score(params, batch), examples, mesh=mesh,
                             rules=rules, batch_size=batch_size, buckets=buckets, pad_id=pad_id)
  return {f"{prefix}_{k}": np.stack([v[0], v[1]], axis=1).astype(np.float32)
          for k, v in {"logps": out["logps"], **{s: out[s] for s in stats}}.items()}
