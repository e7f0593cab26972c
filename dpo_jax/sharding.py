"""Mesh, logical axis rules, and shardings for params, train state and batches.

Weights and activations carry logical axis names ("embed", "heads", "batch", ...). A short rule
table maps each to mesh axes (data, fsdp, tensor). Defaults: FSDP over data×fsdp (weights are
sharded on their embed dimension over both axes, ZeRO-3 style), tensor parallelism on heads, MLP
and vocab, and the batch split over data×fsdp. Configs may override single rules.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # weights
    ("embed", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 (all remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  sizes = [data, fsdp, tensor]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh: sizes must be positive or -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if free:
    if n % known:
      raise ValueError(f"config.mesh: {dict(zip(MESH_AXES, sizes))} does not divide the "
                       f"{n} devices")
    sizes[free[0]] = n // known
  if math.prod(sizes) != n:
    raise ValueError(f"config.mesh: {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} "
                     f"devices but {n} are available")
  return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def rules_from_config(overrides: dict | None = None) -> tuple[tuple[str, Any], ...]:
  """Default rules with overrides {logical_name: mesh axis | tuple | None}."""
  rules = dict(DEFAULT_RULES)
  for k, v in (overrides or {}).items():
    rules[k] = tuple(v) if isinstance(v, list) else v
  return tuple(rules.items())


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh,
                    rules) -> P:
  """Maps logical names to a PartitionSpec; mesh axes that do not divide a dim are dropped."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(names):
    axes = table.get(name) if name is not None else None
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    keep = []
    size = 1
    for a in axes:
      if a in used or mesh.shape[a] == 1:
        continue
      if shape is not None and shape[i] % (size * mesh.shape[a]):
        continue
      keep.append(a)
      size *= mesh.shape[a]
    used.update(keep)
    out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
  return P(*out)


def tree_shardings(names_tree, shapes_tree, mesh: Mesh, rules):
  """NamedShardings for a tree of arrays given a matching tree of logical-name tuples."""
  return jax.tree.map(
      lambda names, x: NamedSharding(mesh, logical_to_spec(names, np.shape(x), mesh, rules)),
      names_tree, shapes_tree, is_leaf=lambda n: isinstance(n, tuple))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), None, mesh,
                                             rules))


# ---------------------------------------------------------------------------------------------
# Activation constraints: active only while a mesh and rules are installed (inside the step).
# ---------------------------------------------------------------------------------------------

_CTX = threading.local()


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules):
  prev = getattr(_CTX, "value", None)
  _CTX.value = (mesh, rules)
  try:
    yield
  finally:
    _CTX.value = prev


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  ctx = getattr(_CTX, "value", None)
  if ctx is None:
    return x
  mesh, rules = ctx
  spec = logical_to_spec(names, x.shape, mesh, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def to_host(tree):
  """NumPy copies of a pytree of arrays on every process. A leaf sharded over devices of several
  processes (a batch's per-example outputs, FSDP weights) is all-gathered first: jax.device_get
  alone only reads arrays that are fully addressable or replicated."""
  from jax.experimental import multihost_utils   # noqa: PLC0415

  def get(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))
  return jax.tree.map(get, tree)


def host_local_array(global_np: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from this host's rows of `global_np` (every host holds the same batch
  description; each contributes only the rows its devices own). Along each axis the host's
  blocks are taken in order and joined, as make_array_from_process_local_data maps them: they
  need not be contiguous (a TPU mesh orders devices by their place in the torus, so one host's
  batch shards may lie between another's)."""
  index_map = sharding.addressable_devices_indices_map(global_np.shape)
  local = global_np
  for dim, size in enumerate(global_np.shape):
    blocks = sorted({idx[dim].indices(size)[:2] for idx in index_map.values()})
    if blocks != [(0, size)]:
      local = np.take(local, np.concatenate([np.arange(a, b) for a, b in blocks]), axis=dim)
  return jax.make_array_from_process_local_data(sharding, local, global_np.shape)
  block = []
  for dim in range(global_np.ndim):
    starts = [idx[dim].start or 0 for idx in index_map.values()]
    stops = [global_np.shape[dim] if idx[dim].stop is None else idx[dim].stop
             for idx in index_map.values()]
    block.append(slice(min(starts), max(stops)))
  return jax.make_array_from_process_local_data(sharding, global_np[tuple(block)],
                                                global_np.shape)
