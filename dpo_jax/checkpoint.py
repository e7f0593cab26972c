"""Orbax checkpoints: train state saved and resumed; params restored as a reference.

Layout of W/checkpoints/<step>/:
  params/   the policy params (restorable alone, e.g. as the next stage's reference)
  train/    optimizer state, loss state, step, rng
  ref/      the TR-DPO moving reference (reference.mode='sync' only: it is training state)
  meta/     JSON: the model config (HF form plus dtype settings), data position, config
  integrity.json   size and CRC32 of every file above, written (atomically) after the save
Orbax writes each step to a temporary directory and renames it when complete, so a kill during a
save leaves the previous checkpoint usable. Restores check integrity.json first, so a truncated
or corrupted file is reported instead of loaded as garbage.
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from dpo_jax import writers
from dpo_jax.models.config import ModelConfig


class CheckpointError(ValueError):
  pass


def manager(directory: str, max_to_keep: Optional[int] = 3) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)
  handlers = {"params": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
              "ref": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_handlers=handlers)


def save(mgr: ocp.CheckpointManager, step: int, params, train, meta: dict, ref=None):
  items = dict(params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train),
               meta=ocp.args.JsonSave(meta))
  if ref is not None:
    items["ref"] = ocp.args.StandardSave(ref)
  mgr.save(step, args=ocp.args.Composite(**items), force=True)
  mgr.wait_until_finished()
  if jax.process_index() == 0:
    write_manifest(step_dir(mgr, step))


MANIFEST = "integrity.json"


def step_dir(mgr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mgr.directory), str(step))


def _files(directory: str):
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if rel != MANIFEST:
        yield rel, path


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      crc = zlib.crc32(chunk, crc)
  return crc


def write_manifest(directory: str):
  """Records size and CRC32 of every file of a finished checkpoint (local filesystems only)."""
  if "://" in directory or not os.path.isdir(directory):
    return
  files = {rel: [os.path.getsize(p), _crc32(p)] for rel, p in _files(directory)}
  writers.write_atomic(os.path.join(directory, MANIFEST), lambda f: json.dump({"files": files}, f))


def verify(directory: str):
  """Raises CheckpointError if a file listed in integrity.json is missing, truncated or
  changed. A checkpoint without the manifest (written elsewhere) is not checked."""
  path = os.path.join(directory, MANIFEST)
  if "://" in directory or not os.path.exists(path):
    return
  try:
    with open(path) as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError) as e:
    raise CheckpointError(f"{directory}: unreadable {MANIFEST} ({e}); the checkpoint may be "
                          "corrupted") from None
  for rel, (size, crc) in sorted(files.items()):
    p = os.path.join(directory, rel)
    if not os.path.exists(p):
      raise CheckpointError(f"{directory}: file {rel} is missing; the checkpoint is incomplete")
    if os.path.getsize(p) != size:
      raise CheckpointError(f"{directory}: file {rel} is {os.path.getsize(p)} bytes, {size} "
                            "when saved; the checkpoint is truncated or corrupted")
    if _crc32(p) != crc:
      raise CheckpointError(f"{directory}: file {rel} has changed since it was saved (CRC32 "
                            "mismatch); the checkpoint is corrupted")


def restore(mgr: ocp.CheckpointManager, step: int, abstract_params, abstract_train,
            abstract_ref=None):
  """(params, train, meta, ref); ref is None unless abstract_ref is given."""
  verify(step_dir(mgr, step))
  check_params(mgr, step, abstract_params)
  items = dict(params=ocp.args.StandardRestore(abstract_params),
               train=ocp.args.StandardRestore(abstract_train), meta=ocp.args.JsonRestore())
  if abstract_ref is not None:
    items["ref"] = ocp.args.StandardRestore(abstract_ref)
  try:
    r = mgr.restore(step, args=ocp.args.Composite(**items))
  except ValueError as e:   # the params matched (checked above): the train state does not
    raise CheckpointError(
        f"{mgr.directory}/{step}: its train state (optimizer, loss state, counters) does not "
        f"match this run's config; resume with the config that wrote it, or use the "
        f"checkpoint as model.init / reference.path instead. Orbax: {str(e)[:500]}") from None
  return r.params, r.train, r.meta, (r.ref if abstract_ref is not None else None)


def objective(config: dict) -> dict:
  """What a run optimises besides the model (config as JSON): the loss, where log π_ref comes
  from, and the teacher. A precomputed reference and the `initial` mode have the same source;
  hyperparameters (β, the learning rate, steps) are not part of it."""
  ref, teacher = config.get("reference") or {}, config.get("teacher") or {}
  where = lambda path: os.path.realpath(path) if path else None   # noqa: E731
  return {"loss.name": (config.get("loss") or {}).get("name"),
          "the reference": "none" if ref.get("mode") == "none" else (
              where(ref.get("path")) or "the initial policy"),
          "teacher.path": None if teacher.get("mode", "none") == "none" else
          where(teacher.get("path"))}


def check_resume(mgr: ocp.CheckpointManager, step: int, model_cfg: ModelConfig,
                 saves_ref: bool, config=None):
  """What resuming needs beyond parameters of the right shapes: the model the checkpoint was
  trained as (a changed rope_theta or norm eps keeps every shape; how it computes, dtype or
  remat, may change), the same objective as `config` (a ConfigDict, see `objective`), and
  TR-DPO's moving reference saved exactly when this run keeps one."""
  from dpo_jax.models import load   # noqa: PLC0415  (load imports this module)
  meta = read_meta(mgr, step)
  saved = ModelConfig.from_hf_dict(meta["model"], **load.numerics(model_cfg))
  if config is not None and "config" in meta:
    was, now = (objective(json.loads(c)) for c in (meta["config"], config.to_json_best_effort()))
    if diff := "; ".join(f"{k}: {was[k]!r} vs {now[k]!r}" for k in was if was[k] != now[k]):
      raise CheckpointError(f"{mgr.directory}/{step}: written for another objective than this "
                            f"config's (checkpoint vs config): {diff}; resume with the config "
                            "that wrote it, or start a new workdir with config.model.init set "
                            "to this checkpoint")
  if diff := saved.architecture_diff(model_cfg):
    raise CheckpointError(f"{mgr.directory}/{step}: written for another model than config.model "
                          f"describes (checkpoint vs config): {diff}; resume with the config "
                          "that wrote it, or use the checkpoint as model.init in a new workdir")
  has_ref = mgr.item_metadata(step).get("ref") is not None
  if has_ref and not saves_ref:
    raise CheckpointError(f"{mgr.directory}/{step}: it holds TR-DPO's moving reference "
                          "(config.reference.mode='sync'), which this run's reference mode "
                          "would drop; resume with reference.mode='sync'")
  if saves_ref and not has_ref:
    raise CheckpointError(f"{mgr.directory}/{step}: config.reference.mode='sync' needs the "
                          "moving reference, but this checkpoint was written by another "
                          "reference mode; resume with the mode that wrote it")


def read_meta(mgr: ocp.CheckpointManager, step: int) -> dict:
  return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def check_params(mgr: ocp.CheckpointManager, step: int, abstract_params):
  """Raises CheckpointError naming the first parameter whose path or shape does not match."""
  stored = mgr.item_metadata(step)["params"]
  stored = {jax.tree_util.keystr(k): tuple(v.shape)
            for k, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
  for k, v in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    name = jax.tree_util.keystr(k)
    if name not in stored:
      raise CheckpointError(f"{mgr.directory}/{step}: parameter {name} missing from the "
                            "checkpoint (a different architecture?)")
    if stored[name] != tuple(v.shape):
      raise CheckpointError(f"{mgr.directory}/{step}: parameter {name} has shape "
                            f"{stored[name]} in the checkpoint but {tuple(v.shape)} in the model")
  expected = {jax.tree_util.keystr(k) for k, _ in
              jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  extra = sorted(set(stored) - expected)
  if extra:
    raise CheckpointError(f"{mgr.directory}/{step}: checkpoint has parameter {extra[0]} that "
                          "the model does not (a different architecture?)")


# ---------------------------------------------------------------------------------------------
# A checkpoint as a model: for references, init_from, scoring.
# ---------------------------------------------------------------------------------------------


def resolve(path: str) -> tuple[str, int]:
  """W, W/checkpoints or W/checkpoints/<step> -> (checkpoints dir, step)."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(os.path.join(path, "params")):
    return os.path.dirname(path), int(base)
  steps = sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []
  if not steps:
    raise CheckpointError(f"{path}: no dpo_jax checkpoint found")
  return path, steps[-1]


def is_checkpoint(path: str) -> bool:
  try:
    resolve(path)
    return True
  except (CheckpointError, OSError):
    return False


def load_model_config(path: str) -> tuple[ModelConfig, dict]:
  directory, step = resolve(path)
  meta = read_meta(manager(directory, None), step)
  cfg = ModelConfig.from_hf_dict(meta["model"], **meta.get("model_numerics", {}))
  return cfg, meta


def restore_params(path: str, abstract_params) -> Any:
  """Restores only the policy params of a checkpoint, resharded as `abstract_params` says."""
  directory, step = resolve(path)
  mgr = manager(directory, None)
  verify(step_dir(mgr, step))
  check_params(mgr, step, abstract_params)
  return mgr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params))).params


def abstract_like(tree, shardings) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, shardings)
