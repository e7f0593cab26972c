"""Hugging Face model directories <-> (ModelConfig, params).

A directory holds config.json, model.safetensors or model.safetensors.index.json with its shards,
and optionally tokenizer files and generation_config.json. Weights are converted one tensor at a
time (no torch model is built), so host memory peaks at about one stacked weight.

Shapes: D hidden, H query heads, K kv heads, Dh head dim, F MLP width, V vocab, L layers.
HF stores a Linear as weight [out, in]; dpo_jax stores kernel [in, out] and keeps head structure
([D, H, Dh] for q/k/v, [H, Dh, D] for o_proj). Per-layer tensors model.layers.{i}.* are stacked
on a leading layers axis.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from dpo_jax import sharding
from dpo_jax.models import core
from dpo_jax.models.config import ModelConfig, read_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters write that carry no weights (recomputed from config.json).
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


# ---------------------------------------------------------------------------------------------
# The import tables: one per family. hook converts HF -> ours and back; `s` is our (per-layer)
# shape.
# ---------------------------------------------------------------------------------------------

HOOKS = {
    "copy": (lambda x, s: x, lambda x, s: x),
    # nn.Linear weight [out, in] <-> kernel [in, out].
    "transpose": (lambda x, s: x.T, lambda x, s: x.T),
    # q/k/v weight [H*Dh, D] <-> kernel [D, H, Dh].
    "to_heads": (lambda x, s: x.T.reshape(s), lambda x, s: x.reshape(s[0], -1).T),
    # o_proj weight [D, H*Dh] <-> kernel [H, Dh, D].
    "from_heads": (lambda x, s: x.T.reshape(s), lambda x, s: x.reshape(-1, s[-1]).T),
    # q/k/v bias [H*Dh] <-> [H, Dh].
    "heads_bias": (lambda x, s: x.reshape(s), lambda x, s: x.reshape(-1)),
}


@dataclasses.dataclass(frozen=True)
class Entry:
  hf: str                    # HF tensor name; "{i}" marks a per-layer tensor
  path: tuple[str, ...]      # our param tree path
  hf_shape: tuple[int, ...]  # the HF tensor's shape (per layer)
  hook: str                  # key of HOOKS

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf


def llama_table(cfg: ModelConfig) -> list[Entry]:
  """The tensors of every family (ModelConfig refuses a Llama's attention_bias: HF's also puts
  a bias on o_proj, which the Decoder does not have)."""
  d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  h, k, dh = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
  at, mlp = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
  a, m = ("layers", "self_attn"), ("layers", "mlp")
  table = [
      Entry("model.embed_tokens.weight", ("embed_tokens", "embedding"), (v, d), "copy"),
      Entry("model.layers.{i}.input_layernorm.weight", ("layers", "input_layernorm", "scale"),
            (d,), "copy"),
      Entry(at + "q_proj.weight", a + ("q_proj", "kernel"), (h * dh, d), "to_heads"),
      Entry(at + "k_proj.weight", a + ("k_proj", "kernel"), (k * dh, d), "to_heads"),
      Entry(at + "v_proj.weight", a + ("v_proj", "kernel"), (k * dh, d), "to_heads"),
      Entry(at + "o_proj.weight", a + ("o_proj", "kernel"), (d, h * dh), "from_heads"),
      Entry("model.layers.{i}.post_attention_layernorm.weight",
            ("layers", "post_attention_layernorm", "scale"), (d,), "copy"),
      Entry(mlp + "gate_proj.weight", m + ("gate_proj", "kernel"), (f, d), "transpose"),
      Entry(mlp + "up_proj.weight", m + ("up_proj", "kernel"), (f, d), "transpose"),
      Entry(mlp + "down_proj.weight", m + ("down_proj", "kernel"), (d, f), "transpose"),
      Entry("model.norm.weight", ("norm", "scale"), (d,), "copy"),
  ]
  if not cfg.tie_word_embeddings:   # tied: the unembedding is embed_tokens.T, no lm_head
    table.append(Entry("lm_head.weight", ("lm_head", "kernel"), (v, d), "transpose"))
  return table


def qwen2_table(cfg: ModelConfig) -> list[Entry]:
  """Llama's table plus biases on q/k/v (always present in Qwen2: ModelConfig sees to it)."""
  h, k, dh = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
  at, a = "model.layers.{i}.self_attn.", ("layers", "self_attn")
  return llama_table(cfg) + [
      Entry(at + "q_proj.bias", a + ("q_proj", "bias"), (h * dh,), "heads_bias"),
      Entry(at + "k_proj.bias", a + ("k_proj", "bias"), (k * dh,), "heads_bias"),
      Entry(at + "v_proj.bias", a + ("v_proj", "bias"), (k * dh,), "heads_bias"),
  ]


def mistral_table(cfg: ModelConfig) -> list[Entry]:
  return llama_table(cfg)   # same tensors; the sliding window lives in config.json


TABLES = {"llama": llama_table, "qwen2": qwen2_table, "mistral": mistral_table}


def _names(entry: Entry, cfg: ModelConfig) -> list[str]:
  if entry.per_layer:
    return [entry.hf.format(i=i) for i in range(cfg.num_layers)]
  return [entry.hf]


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _brief(names, n: int = 20) -> str:
  names = sorted(names)
  more = f" ... and {len(names) - n} more" if len(names) > n else ""
  return ", ".join(names[:n]) + more


# ---------------------------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------------------------


class _Reader:
  """Lazily reads single tensors (as NumPy arrays) from the safetensors files of a directory."""

  def __init__(self, path: str, stack: contextlib.ExitStack):
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
      index_json = read_json(index)
      if not isinstance(index_json, dict) or "weight_map" not in index_json:
        raise ValueError(f"{index}: no 'weight_map' object")
      self.weight_map = index_json["weight_map"]
    elif os.path.exists(os.path.join(path, SINGLE_FILE)):
      with self._reading(SINGLE_FILE, path), safe_open(os.path.join(path, SINGLE_FILE),
                                                       framework="np") as f:
        self.weight_map = {name: SINGLE_FILE for name in f.keys()}
    else:
      raise FileNotFoundError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    self._path, self._stack, self._open = path, stack, {}

  @staticmethod
  @contextlib.contextmanager
  def _reading(file: str, path: str, name: str = ""):
    """Names the file (and tensor) in a safetensors error, e.g. a truncated download."""
    try:
      yield
    except (OSError, SafetensorError) as e:
      raise ValueError(f"{os.path.join(path, file)}: cannot read "
                       f"{f'tensor {name!r}' if name else 'the file'}: {e}") from e

  def _handle(self, name: str, framework: str = "np"):
    key = (self.weight_map[name], framework)
    if key not in self._open:
      with self._reading(key[0], self._path):
        self._open[key] = self._stack.enter_context(
            safe_open(os.path.join(self._path, key[0]), framework=framework))
    return self._open[key]

  def shape(self, name: str) -> tuple[int, ...]:
    handle = self._handle(name)
    with self._reading(self.weight_map[name], self._path, name):
      return tuple(handle.get_slice(name).get_shape())

  def read(self, name: str) -> np.ndarray:
    handle = self._handle(name)
    with self._reading(self.weight_map[name], self._path, name):
      if handle.get_slice(name).get_dtype() in ("BF16", "F8_E4M3", "F8_E5M2"):
        # safetensors' NumPy backend cannot hold these; its JAX backend can (ml_dtypes). Read
        # on the host CPU device so a large tensor never lands whole on one accelerator.
        with jax.default_device(_host_device()):
          return np.asarray(self._handle(name, "flax").get_tensor(name))
      return handle.get_tensor(name)


def _host_device():
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:   # no CPU backend registered (JAX_PLATFORMS excludes it)
    return None


def _check_names(reader: _Reader, table: list[Entry], cfg: ModelConfig):
  expected = {n for e in table for n in _names(e, cfg)}
  present = set(reader.weight_map)
  ignored = {n for n in present if IGNORED.match(n)}
  if cfg.tie_word_embeddings:
    ignored.add("lm_head.weight")   # some exporters save the tied copy; transformers drops it
  missing, unexpected = expected - present, present - expected - ignored
  if missing or unexpected:
    raise ValueError(
        f"{reader._path}: the {cfg.family} checkpoint does not match config.json: "
        + (f"missing tensors [{_brief(missing)}]" if missing else "")
        + ("; " if missing and unexpected else "")
        + (f"unexpected tensors [{_brief(unexpected)}]" if unexpected else ""))
  bad = []
  for e in table:
    for name in _names(e, cfg):
      got = reader.shape(name)
      if got != e.hf_shape:
        bad.append(f"{name}: checkpoint shape {got}, expected {e.hf_shape} from config.json")
  if bad:
    raise ValueError(f"{reader._path}: tensor shape mismatch: " + "; ".join(bad))


def load_hf(path: str, *, shardings=None, dtype=None, **cfg_overrides):
  """(ModelConfig, params) from a HF model directory.

  dtype: the params' dtype (sets cfg.param_dtype; default cfg.param_dtype, i.e. float32 unless
  overridden). shardings: a pytree of jax.sharding.Sharding matching the params (or one sharding
  for all); each array is placed there as soon as it is converted. cfg_overrides: ModelConfig
  fields (dtype, remat, ...).
  """
  cfg = ModelConfig.from_hf_dir(path, **cfg_overrides)
  if dtype is not None:
    cfg = cfg.replace(param_dtype=jnp.dtype(dtype).name)
  table = TABLES[cfg.family](cfg)
  abstract = core.abstract_params(cfg)
  params: dict[str, Any] = {}
  with contextlib.ExitStack() as stack:
    reader = _Reader(path, stack)
    _check_names(reader, table, cfg)
    for e in table:
      want = _get(abstract, e.path)
      to_ours = HOOKS[e.hook][0]
      target_dtype = np.dtype(want.dtype)
      if e.per_layer:
        if want.shape[0] != cfg.num_layers:
          raise ValueError(f"{'/'.join(e.path)}: leading axis {want.shape[0]} != num_layers")
        out = np.empty(want.shape, target_dtype)
        for i, name in enumerate(_names(e, cfg)):
          out[i] = to_ours(reader.read(name), want.shape[1:])
      else:
        out = np.asarray(to_ours(reader.read(e.hf), want.shape), dtype=target_dtype)
      if out.shape != want.shape:   # the table and the Decoder disagree: a dpo_jax bug
        raise ValueError(f"{e.hf} -> {'/'.join(e.path)}: converted shape {out.shape}, "
                         f"Decoder expects {want.shape}")
      if shardings is None:
        leaf = jax.device_put(out)
      elif isinstance(shardings, jax.sharding.Sharding):
        leaf = jax.device_put(out, shardings)
      else:
        leaf = jax.device_put(out, _get(shardings, e.path))
      _set(params, e.path, leaf)
      del out
  if jax.tree.structure(params) != jax.tree.structure(abstract):
    raise ValueError(f"import table for {cfg.family} does not cover the Decoder's params: "
                     f"{jax.tree.structure(abstract)} vs {jax.tree.structure(params)}")
  return cfg, params


# ---------------------------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------------------------


def save_hf(path: str, cfg: ModelConfig, params, *, tokenizer=None,
            max_shard_bytes: int = 5 * 2**30, dtype=None,
            generation_config: Optional[dict] = None) -> str:
  """Writes a HF model directory that transformers loads; returns `path`.

  params may be sharded (gathered to host one weight at a time). dtype: the saved dtype
  (default: the params'). Above max_shard_bytes the weights are split into
  model-0000k-of-0000N.safetensors with model.safetensors.index.json. generation_config.json
  holds `generation_config` (the source model's: sampling defaults, every stop id) over cfg's
  BOS/EOS/pad ids; none is written (and an earlier one is removed) when both are empty. In
  multi-host runs every process must call this; process 0 writes.
  """
  table = TABLES[cfg.family](cfg)
  abstract = core.abstract_params(cfg)
  if jax.tree.structure(params) != jax.tree.structure(abstract):
    raise ValueError(f"params do not fit the config (tie_word_embeddings, attention_bias?): "
                     f"{jax.tree.structure(params)} vs {jax.tree.structure(abstract)}")
  first = _get(params, table[0].path)
  out_dtype = jnp.dtype(dtype if dtype is not None else first.dtype)
  write = jax.process_index() == 0

  # Plan the shards from shapes alone, then stream: host memory holds one weight + one shard.
  plan, shard, shard_bytes = [], 0, 0
  for e in table:
    nbytes = math.prod(e.hf_shape) * out_dtype.itemsize
    for i, name in enumerate(_names(e, cfg)):
      if shard_bytes and shard_bytes + nbytes > max_shard_bytes:
        shard, shard_bytes = shard + 1, 0
      plan.append((name, e, i, shard))
      shard_bytes += nbytes
  n_shards = shard + 1
  files = ([SINGLE_FILE] if n_shards == 1 else
           [f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors" for k in range(n_shards)])

  if write:
    os.makedirs(path, exist_ok=True)
    for old in os.listdir(path):   # stale weights of an earlier export would shadow these
      if old == INDEX_FILE or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", old):
        os.remove(os.path.join(path, old))

  current: dict[str, np.ndarray] = {}
  host_entry, host = None, None
  weight_map, total = {}, 0
  for n, (name, e, i, shard) in enumerate(plan):
    if host_entry is not e:
      host_entry, host = e, sharding.to_host(_get(params, e.path))
      want = _get(abstract, e.path).shape
      if host.shape != want:
        raise ValueError(f"{'/'.join(e.path)}: params shape {host.shape}, config implies {want}")
    x = host[i] if e.per_layer else host
    x = HOOKS[e.hook][1](x, x.shape)
    if tuple(x.shape) != e.hf_shape:
      raise ValueError(f"{name}: exported shape {x.shape}, expected {e.hf_shape}")
    current[name] = np.ascontiguousarray(x, dtype=out_dtype)
    weight_map[name] = files[shard]
    total += current[name].nbytes
    if n + 1 == len(plan) or plan[n + 1][3] != shard:
      if write:
        save_file(current, os.path.join(path, files[shard]), metadata={"format": "pt"})
      current = {}
  if not write:
    return path

  if n_shards > 1:
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2,
                sort_keys=True)
  hf = cfg.to_hf_dict()
  hf["dtype"] = hf["torch_dtype"] = out_dtype.name   # v5 reads "dtype", v4 "torch_dtype"
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf[k] is not None}
  gen.update(generation_config or {})
  gen_path = os.path.join(path, "generation_config.json")
  if gen:
    with open(gen_path, "w") as f:
      json.dump(gen, f, indent=2, sort_keys=True)
  elif os.path.exists(gen_path):   # an earlier export's ids, which this model does not have
    os.remove(gen_path)
  if tokenizer is not None:
    tokenizer.save_pretrained(path)
  return path


# ---------------------------------------------------------------------------------------------
# Tokenizer and directory detection.
# ---------------------------------------------------------------------------------------------


def load_tokenizer(path: str):
  """The tokenizer saved in a local HF directory (never downloads)."""
  from transformers import AutoTokenizer, PreTrainedTokenizerFast
  declared = None
  config = os.path.join(path, "tokenizer_config.json")
  if os.path.isfile(config):
    declared = read_json(config)
    declared = declared.get("tokenizer_class") if isinstance(declared, dict) else None
  if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
    # A generic tokenizer.json (e.g. one built by dpo_jax): AutoTokenizer would swap in the
    # model type's own class (Qwen2Tokenizer, ...), which rebuilds a different pipeline.
    return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
  return AutoTokenizer.from_pretrained(path, local_files_only=True)


def is_hf_dir(path: str) -> bool:
  """True for a directory with config.json and safetensors weights."""
  if not os.path.isfile(os.path.join(path, "config.json")):
    return False
  return (os.path.isfile(os.path.join(path, SINGLE_FILE))
          or os.path.isfile(os.path.join(path, INDEX_FILE)))


def hf_tensor_names(cfg: ModelConfig) -> list[str]:
  """Every HF tensor name the import table expects for cfg, in table order."""
  return [n for e in TABLES[cfg.family](cfg) for n in _names(e, cfg)]


__all__ = ["load_hf", "save_hf", "load_tokenizer", "is_hf_dir", "hf_tensor_names", "TABLES",
           "Entry", "HOOKS"]
