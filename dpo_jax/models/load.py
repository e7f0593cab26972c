"""Where a model comes from: a Hugging Face directory, a dpo_jax checkpoint, or scratch.

All three give (ModelConfig, params placed on the mesh) and a tokenizer, so training, the
reference, scoring and ranking share one loader.
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Optional

import jax

from dpo_jax import checkpoint, sharding
from dpo_jax.data.tokenizer import byte_tokenizer
from dpo_jax.models import core, hf_io
from dpo_jax.models.config import ModelConfig

NUMERICS = ("dtype", "param_dtype", "remat", "scan_layers", "attention_chunk", "attention_impl")


def numerics(cfg: ModelConfig) -> dict:
  """cfg's NUMERICS: how it computes, not what it is (a reference or teacher takes the
  student's; a checkpoint records them)."""
  return {k: getattr(cfg, k) for k in NUMERICS}


# A Hugging Face hub model id ("org/name"), as a path that does not exist reads.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.jinja"]


def local(path: Optional[str]) -> Optional[str]:
  """A model source as a local path: a path that exists as it is; a hub model id ("org/name")
  that is no local path, fetched once into the Hugging Face cache (config, safetensors and
  tokenizer files; HF_HUB_OFFLINE=1 reads only the cache). Every loader here takes either."""
  if not path or os.path.exists(path) or not HUB_ID.fullmatch(str(path)):
    return path
  return _fetch(str(path))


@functools.lru_cache(maxsize=None)
def _fetch(repo_id: str) -> str:
  from huggingface_hub import snapshot_download   # noqa: PLC0415
  try:
    return snapshot_download(repo_id, allow_patterns=HUB_FILES)
  except Exception as e:   # noqa: BLE001 (offline, unknown, gated: all say the same to a user)
    raise FileNotFoundError(f"{repo_id}: no such local path, and as a Hugging Face hub model id "
                            f"it could not be fetched ({type(e).__name__}: {e})") from None


def source_kind(path: Optional[str]) -> str:
  """"scratch", "hf" or "checkpoint" for a local path (the loaders below resolve a hub id to
  one first, with local())."""
  if not path:
    return "scratch"
  if hf_io.is_hf_dir(path):
    return "hf"
  if checkpoint.is_checkpoint(path):
    return "checkpoint"
  raise FileNotFoundError(f"{path}: neither a Hugging Face model directory (config.json + "
                          "*.safetensors) nor a dpo_jax checkpoint")


def model_config(path: Optional[str], scratch: ModelConfig, **numerics) -> ModelConfig:
  """The architecture comes from the source; dtype / param_dtype / remat from the caller."""
  path = local(path)
  kind = source_kind(path)
  if kind == "hf":
    cfg = ModelConfig.from_hf_dir(path, **numerics)
  elif kind == "checkpoint":
    # The attention kernel is a choice of the machine that runs the model, not part of it: a
    # checkpoint trained with cuDNN attention loads here with the default unless asked.
    cfg = checkpoint.load_model_config(path)[0].replace(
        **{"attention_impl": ModelConfig.attention_impl, **numerics})
  else:
    cfg = scratch.replace(**numerics)
  if cfg.attention_impl == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(f"model.attention_impl='cudnn' needs an NVIDIA GPU, but the jax backend "
                     f"is {jax.default_backend()!r} (use 'einsum' or 'xla')")
  return cfg


def param_shardings(cfg: ModelConfig, mesh, rules):
  return sharding.tree_shardings(core.logical_axes(cfg), core.abstract_params(cfg), mesh, rules)


def load_params(path: Optional[str], cfg: ModelConfig, mesh, rules, seed: int = 0):
  """Params of `cfg` from `path` (or a seeded random init), placed with the mesh rules."""
  path = local(path)
  shardings = param_shardings(cfg, mesh, rules)
  kind = source_kind(path)
  if kind == "hf":
    _, params = hf_io.load_hf(path, shardings=shardings, **numerics(cfg))
    return params
  if kind == "checkpoint":
    abstract = checkpoint.abstract_like(core.abstract_params(cfg), shardings)
    return checkpoint.restore_params(path, abstract)
  return core.init_params(cfg, seed, shardings)


def load_tokenizer(path: Optional[str]):
  """The source's tokenizer; a dpo_jax workdir keeps its tokenizer in W/tokenizer. `path` may
  also be a directory holding only tokenizer files."""
  path = local(path)
  if path and not hf_io.is_hf_dir(path) and os.path.exists(
      os.path.join(path, "tokenizer_config.json")):
    return hf_io.load_tokenizer(path)
  kind = source_kind(path)
  if kind == "hf":
    return hf_io.load_tokenizer(path)
  if kind == "checkpoint":
    directory, _ = checkpoint.resolve(path)
    tok_dir = os.path.join(os.path.dirname(directory), "tokenizer")
    if os.path.isdir(tok_dir):
      return hf_io.load_tokenizer(tok_dir)
  return byte_tokenizer()


def generation_config(path: Optional[str], _depth: int = 0) -> Optional[dict]:
  """The model's generation_config.json: sampling defaults and stop ids (Llama 3 Instruct's
  lists <|eot_id|>, which its config.json may not). A Hugging Face directory's own; a dpo_jax
  checkpoint's is that of the model its run started from (model.init), if it is still there.
  None when there is none."""
  path = local(path)
  kind = source_kind(path)
  if kind == "checkpoint" and _depth < 4:
    meta = checkpoint.load_model_config(path)[1]
    init = json.loads(meta.get("config", "{}")).get("model", {}).get("init")
    try:
      return generation_config(init, _depth + 1) if init else None
    except FileNotFoundError:   # moved or deleted since the run
      return None
  gen = os.path.join(path, "generation_config.json") if kind == "hf" else None
  if not (gen and os.path.isfile(gen)):
    return None
  try:
    with open(gen) as f:
      value = json.load(f)
  except ValueError as e:
    raise ValueError(f"{gen}: {e}") from None
  if not isinstance(value, dict):
    raise ValueError(f"{gen}: holds a {type(value).__name__}, not a JSON object")
  return value
