"""Params as plain pytrees: the model is split into (graphdef, params) once at the jit boundary."""
from __future__ import annotations

import functools

import jax
from flax import nnx

from dpo_jax.models.config import ModelConfig
from dpo_jax.models.llama import Decoder


@functools.lru_cache(maxsize=32)
def _split(cfg: ModelConfig):
  model = nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  axes = nnx.to_pure_dict(nnx.get_partition_spec(state))
  axes = jax.tree.map(tuple, axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return graphdef, nnx.to_pure_dict(state), axes


def split(cfg: ModelConfig):
  """(graphdef, abstract params {name: ShapeDtypeStruct}, logical axes {name: tuple})."""
  return _split(cfg)


def abstract_params(cfg: ModelConfig):
  return _split(cfg)[1]


def logical_axes(cfg: ModelConfig):
  return _split(cfg)[2]


def init_params(cfg: ModelConfig, seed: int, shardings=None):
  """Random init (std 0.02 as transformers), created directly with the given shardings."""
  leaves, treedef = jax.tree.flatten(shardings) if shardings is not None else (None, None)
  init = _init_fn(cfg, None if leaves is None else (tuple(leaves), treedef))
  return init(jax.numpy.asarray(seed, jax.numpy.int32))


@functools.lru_cache(maxsize=16)
def _init_fn(cfg: ModelConfig, flat_shardings):
  """One compiled init per (config, shardings); the seed is an argument, not a constant."""
  shardings = None if flat_shardings is None else jax.tree.unflatten(flat_shardings[1],
                                                                      flat_shardings[0])

  def init(seed):
    return nnx.to_pure_dict(nnx.state(Decoder(cfg, nnx.Rngs(jax.random.key(seed)))))
  return jax.jit(init, out_shardings=shardings)


def merge(graphdef, params) -> Decoder:
  return nnx.merge(graphdef, params)
