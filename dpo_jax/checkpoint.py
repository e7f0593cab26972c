"""Orbax checkpoints: train state saved and resumed; params restored as a reference.

Layout of W/checkpoints/<step>/:
  params/   the policy params (restorable alone, e.g. as the next stage's reference)
  train/    optimizer state, loss state, step, rng
  ref/      the TR-DPO moving reference (reference.mode='sync' only: it is training state)
  meta/     JSON: the model config (HF form plus dtype settings), data position, config
Orbax writes each step to a temporary directory and renames it when complete, so a kill during a
save leaves the previous checkpoint usable.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

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


def restore(mgr: ocp.CheckpointManager, step: int, abstract_params, abstract_train,
            abstract_ref=None):
  """(params, train, meta, ref); ref is None unless abstract_ref is given."""
  check_params(mgr, step, abstract_params)
  items = dict(params=ocp.args.StandardRestore(abstract_params),
               train=ocp.args.StandardRestore(abstract_train), meta=ocp.args.JsonRestore())
  if abstract_ref is not None:
    items["ref"] = ocp.args.StandardRestore(abstract_ref)
  r = mgr.restore(step, args=ocp.args.Composite(**items))
  return r.params, r.train, r.meta, (r.ref if abstract_ref is not None else None)


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
  check_params(mgr, step, abstract_params)
  return mgr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params))).params


def abstract_like(tree, shardings) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, shardings)
