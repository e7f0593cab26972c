"""Model configuration for the Llama / Qwen2 / Mistral decoder family, and its HF mapping."""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Optional

FAMILIES = ("llama", "qwen2", "mistral")
ATTENTION_IMPLS = ("einsum", "xla", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")   # of params, activations, a reference or a teacher
REMAT = ("full", "dots", "none")              # the keys of layers.REMAT_POLICIES


def check_dtype(value, key: str) -> str:
  """`value` if it names one of DTYPES; else a ValueError naming the setting `key`."""
  if not isinstance(value, str) or value not in DTYPES:
    raise ValueError(f"{key}={value!r} is not a supported dtype; use one of {DTYPES}")
  return value


def read_json(path: str):
  """The parsed JSON file at `path`; a ValueError naming the file if it does not parse."""
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  family: str = "llama"
  vocab_size: int = 259
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: Optional[int] = None          # defaults to hidden_size // num_heads
  rope_theta: float = 10000.0
  rope_scaling: Optional[tuple] = None     # sorted (key, value) pairs of HF's rope parameters
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: Optional[bool] = None    # bias on q/k/v projections: Qwen2's (None: the
                                           # family's)
  sliding_window: Optional[int] = None     # Mistral (and Qwen2 with use_sliding_window)
  max_position_embeddings: int = 4096
  bos_token_id: Optional[int] = None
  eos_token_id: Optional[int | tuple[int, ...]] = None   # several: any of them ends a sequence
  pad_token_id: Optional[int] = None
  # Numerics and memory (not part of the HF architecture).
  dtype: str = "float32"                   # compute dtype of activations / matmuls
  param_dtype: str = "float32"             # master weights
  remat: str = "full"                      # rematerialisation policy of each layer, see layers.py
  scan_layers: bool = True                 # lax.scan over the stacked layers (compiles one layer)
                                           # or a Python loop (unrolled; faster on CPU, longer
                                           # compile)
  attention_chunk: int = 0                 # > 0: attention in query chunks of this many
                                           # positions, each against the keys up to its end
                                           # (layers.chunked_attention); 0: one [L, L] block
  attention_impl: str = "einsum"           # einsum: layers.dot_product_attention; xla / cudnn:
                                           # jax.nn.dot_product_attention with that implementation
                                           # (cudnn: fused flash attention, NVIDIA GPUs, bf16/fp16)

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"model.family must be one of {FAMILIES}, got {self.family!r}")
    check_dtype(self.dtype, "config.model.dtype")
    check_dtype(self.param_dtype, "config.model.param_dtype")
    if self.remat not in REMAT:
      raise ValueError(f"config.model.remat={self.remat!r} is not a rematerialisation policy; "
                       f"use one of {REMAT}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_heads={self.num_heads} must be a multiple of "
                       f"model.num_kv_heads={self.num_kv_heads}")
    if self.attention_chunk < 0:
      raise ValueError(f"model.attention_chunk={self.attention_chunk} must be >= 0 (0: off)")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"model.attention_impl must be one of {ATTENTION_IMPLS}, "
                       f"got {self.attention_impl!r}")
    if self.attention_impl != "einsum" and self.attention_chunk:
      raise ValueError(f"model.attention_chunk={self.attention_chunk} applies to "
                       f"model.attention_impl='einsum', not {self.attention_impl!r} "
                       "(set one of them)")
    if self.attention_impl == "cudnn" and self.dtype not in ("bfloat16", "float16"):
      raise ValueError(f"model.attention_impl='cudnn' needs model.dtype bfloat16 or float16, "
                       f"got {self.dtype!r}")
    if self.attention_bias is None:   # explicit, as head_dim below
      object.__setattr__(self, "attention_bias", self.family == "qwen2")
    if self.attention_bias != (self.family == "qwen2"):
      raise ValueError(f"model.attention_bias={self.attention_bias} with family="
                       f"{self.family!r}: transformers' Qwen2 always has q/k/v biases, Mistral "
                       "none, and Llama's attention_bias also biases o_proj, which dpo_jax's "
                       "decoder does not have")
    if self.sliding_window is not None and self.family == "llama":
      raise ValueError(f"model.sliding_window={self.sliding_window}: transformers' Llama has "
                       "no sliding window (its config.json could not say it); use "
                       "family='mistral' or 'qwen2'")
    if self.head_dim is None:   # explicit, so that configs from any source compare equal
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

  def architecture(self) -> tuple:
    """The fields that decide parameter shapes and the function computed (not token ids)."""
    skip = {"bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings"}
    return tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                 if f.name not in skip)

  def architecture_diff(self, other: "ModelConfig") -> str:
    """'field: self's vs other's; ...' over architecture(); empty when both compute alike."""
    return "; ".join(f"{k}: {a!r} vs {b!r}" for (k, a), (_, b) in
                     zip(self.architecture(), other.architecture()) if a != b)

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self, embeddings: bool = True) -> int:
    d, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.dim_per_head
    attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
    if self.attention_bias:
      attn += hd * (self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    n = self.num_layers * per_layer + d
    if embeddings:
      n += v * d * (1 if self.tie_word_embeddings else 2)
    elif not self.tie_word_embeddings:
      n += v * d   # the unembedding matmul is compute, the embedding lookup is not
    return n

  # -------------------------------------------------------------------------------------------
  # Hugging Face config.json <-> ModelConfig
  # -------------------------------------------------------------------------------------------

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
    family = hf.get("model_type")
    if family not in FAMILIES:
      raise ValueError(f"unsupported model_type {family!r}; "
                       f"dpo_jax supports {FAMILIES}")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):   # transformers: the same
      raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}; only 'silu' (SwiGLU)")
    if hf.get("mlp_bias"):
      raise ValueError("mlp_bias=True is not supported")
    if float(hf.get("attention_dropout") or 0.0) > 0.0:
      # TRL's DPOTrainer turns dropout off too (DPOConfig.disable_dropout=True, its default).
      warnings.warn(f"attention_dropout={hf['attention_dropout']} is not applied: dpo_jax "
                    "trains and scores without dropout", stacklevel=2)
    # transformers v5 folds rope_theta and rope_scaling into rope_parameters; v4 files have both.
    # As transformers reads them: a rope_scaling replaces rope_parameters, and a rope_theta
    # inside the one used wins over the top-level one.
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
      raise ValueError(f"unsupported rope_type {rope_type!r}; dpo_jax implements "
                       "'default' and 'llama3'")
    scaling = None
    if rope_type == "llama3":
      rope.setdefault("original_max_position_embeddings",   # transformers' default
                      hf.get("max_position_embeddings", 4096))
      keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
      scaling = tuple(sorted([("rope_type", "llama3")] +
                             [(k, int(rope[k]) if k.startswith("original") else float(rope[k]))
                              for k in keys]))
    # transformers' Llama has no sliding window and ignores the key; Mistral and Qwen2 use it.
    window = None if family == "llama" else hf.get(   # MistralConfig's default is 4096
        "sliding_window", 4096 if family == "mistral" else None)
    if family == "qwen2" and not hf.get("use_sliding_window", False):
      window = None
    if family == "qwen2" and window is not None:
      # transformers slides the window only in layers i >= max_window_layers (or per layer_types).
      types = hf.get("layer_types") or [
          "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
          for i in range(hf["num_hidden_layers"])]
      if all(t == "full_attention" for t in types):
        window = None
      elif not all(t == "sliding_attention" for t in types):
        raise ValueError(f"qwen2 with a sliding window in only some layers ({types}) "
                         "is not supported")
    heads = hf["num_attention_heads"]
    kw = dict(
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim"),
        rope_theta=float(theta),
        rope_scaling=scaling,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        # Qwen2 has q/k/v biases whatever the file says, Mistral none (transformers' classes).
        attention_bias=(bool(hf.get("attention_bias", False)) if family == "llama"
                        else family == "qwen2"),
        sliding_window=window,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        bos_token_id=_first(hf.get("bos_token_id")),
        eos_token_id=_ids(hf.get("eos_token_id")),
        pad_token_id=_first(hf.get("pad_token_id")),
    )
    kw.update(overrides)
    return cls(**kw)

  def to_hf_dict(self) -> dict[str, Any]:
    rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
    if self.rope_scaling:
      rope.update(dict(self.rope_scaling))
    hf = {
        "model_type": self.family,
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                           "mistral": "MistralForCausalLM"}[self.family]],
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.dim_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": self.max_position_embeddings,
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_word_embeddings,
        "rope_theta": self.rope_theta,
        "rope_parameters": rope,
        # transformers v4 (and tools that read its files) know only rope_scaling; v5 reads both.
        "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": (list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                         else self.eos_token_id),
        "pad_token_id": self.pad_token_id,
        "torch_dtype": "float32" if self.param_dtype == "float32" else "bfloat16",
    }
    if self.family == "llama":
      hf["attention_bias"] = self.attention_bias
      hf["mlp_bias"] = False
    if self.family == "qwen2":
      hf["use_sliding_window"] = self.sliding_window is not None
      hf["sliding_window"] = self.sliding_window
      hf["max_window_layers"] = 0   # the window applies to every layer, as in the Decoder
    if self.family == "mistral":
      hf["sliding_window"] = self.sliding_window
    return hf

  @classmethod
  def from_hf_dir(cls, path: str, **overrides) -> "ModelConfig":
    file = os.path.join(path, "config.json")
    hf = read_json(file)
    if not isinstance(hf, dict):
      raise ValueError(f"{file}: expected a JSON object, got {type(hf).__name__}")
    try:
      return cls.from_hf_dict(hf, **overrides)
    except KeyError as e:
      raise ValueError(f"{file}: missing key {e.args[0]!r}") from e
    except (ValueError, TypeError) as e:   # unsupported settings, or values of another type
      raise ValueError(f"{file}: {e}") from e


def _first(x):
  return x[0] if isinstance(x, (list, tuple)) else x


def _ids(x):
  """An id, or several (Llama 3 Instruct's EOS: end_of_text, eom, eot) kept as a tuple."""
  if isinstance(x, (list, tuple)):
    return tuple(x) if len(x) > 1 else _first(x) if x else None
  return x


# A tiny built-in model over the byte-level tokenizer (dpo_jax.data.tokenizer), for the embedded
# default job and tests.
TINY = ModelConfig(family="llama", vocab_size=264, hidden_size=64, intermediate_size=192,
                   num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=1024)
