"""Tiny transformers (PyTorch) models and tokenizers for parity tests; nothing is downloaded."""
from __future__ import annotations

import functools

import jax
import numpy as np
import torch
import transformers

from dpo_jax import models

HF_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}

BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def tiny_hf_model(family: str, seed: int = 0, std: float = 0.2, **overrides):
  """A randomly initialised transformers model; std 0.2 so that every weight matters."""
  config_cls, model_cls = HF_CLASSES[family]
  torch.manual_seed(seed)
  model = model_cls(config_cls(**{**BASE, **overrides})).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0.0, std)
      if name.endswith("norm.weight"):
        p.add_(1.0)
  return model


def torch_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


@functools.lru_cache(maxsize=None)
def _forward(cfg: models.ModelConfig):
  graphdef = models.split(cfg)[0]

  @jax.jit
  def f(params, tokens, positions, segment_ids):
    model = models.merge(graphdef, params)
    hidden, _ = model(tokens, positions, segment_ids)
    return model.logits(hidden)

  return f


def our_logits(cfg, params, tokens, positions=None, segment_ids=None) -> np.ndarray:
  tokens = np.asarray(tokens, np.int32)
  if positions is None:
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  if segment_ids is None:
    segment_ids = np.ones_like(tokens)
  return np.asarray(_forward(cfg)(params, tokens, np.asarray(positions, np.int32),
                                  np.asarray(segment_ids, np.int32)))


def tiny_tokenizer(vocab_size: int = 97):
  """A word-level fast tokenizer over "w3 w4 ..." with <unk>/<s>/</s> as ids 0/1/2."""
  from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
  tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                              bos_token="<s>", eos_token="</s>",
                                              pad_token="<unk>")
