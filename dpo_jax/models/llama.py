"""The decoder of the Llama family; Qwen2 (q/k/v bias) and Mistral (sliding window) are flags.

Parameter names mirror transformers (embed_tokens, layers.self_attn.q_proj, ..., norm,
lm_head); layers are stacked on a leading "layers" axis and run with jax.lax.scan, so compile
time does not grow with depth.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax import sharding
from dpo_jax.models import layers
from dpo_jax.models.config import ModelConfig

Array = jax.Array


class Decoder(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_tokens = layers.Weight("embedding", (cfg.vocab_size, cfg.hidden_size),
                                      ("vocab", "embed"), cfg, rngs)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return layers.Block(cfg, rngs)

    self.layers = make_blocks(rngs)
    self.norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.Weight("kernel", (cfg.hidden_size, cfg.vocab_size),
                                   ("embed", "vocab"), cfg, rngs)

  def unembedding(self) -> Array:
    """The [D, V] output projection (the transposed embedding when tied)."""
    if self.cfg.tie_word_embeddings:
      return self.embed_tokens.embedding[...].T
    return self.lm_head.kernel[...]

  def __call__(self, tokens_BxL: Array, positions_BxL: Array, segment_ids_BxL: Array,
               cache: Optional[dict] = None) -> tuple[Array, Optional[dict]]:
    """Final hidden states [B, L, D] (after the last norm), and the updated KV cache.

    segment_ids: 0 marks padding; tokens attend only within their own segment (packing).
    cache: dict(k=[layers,B,S,K,Dh], v=..., pos=[B,S], seg=[B,S], index=int32 scalar); the L new
    tokens are written at slots [index, index + L).
    """
    cfg = self.cfg
    # Gather, then cast: the gradient of a frequent token sums over its positions in the
    # table's dtype (f32 master weights), not in the compute dtype.
    x = self.embed_tokens.embedding[...][tokens_BxL].astype(cfg.dtype)
    x = sharding.constrain(x, ("batch", "length", "act_embed"))
    inv_freq = layers.rope_inv_freq(cfg)

    layer_cache = pos = seg = idx = None
    if cache is not None:
      idx = cache["index"]
      pos = jax.lax.dynamic_update_slice_in_dim(cache["pos"], positions_BxL, idx, 1)
      seg = jax.lax.dynamic_update_slice_in_dim(cache["seg"], segment_ids_BxL, idx, 1)
      layer_cache = {"k": cache["k"], "v": cache["v"]}

    graphdef, block_state = nnx.split(self.layers)

    def body(h, xs):
      state, kv = xs
      c = None if kv is None else {**kv, "pos": pos, "seg": seg, "index": idx}
      h, new_kv = nnx.merge(graphdef, state)(h, positions_BxL, segment_ids_BxL, inv_freq, c)
      return h, new_kv

    policy = layers.REMAT_POLICIES[cfg.remat]
    if cfg.remat != "none":
      body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    # The same body either way: scanned (one compiled layer) or unrolled (static weight slices).
    x, new_kv = jax.lax.scan(body, x, (block_state, layer_cache),
                             unroll=not cfg.scan_layers)
    x = self.norm(x)
    new_cache = None
    if cache is not None:
      new_cache = {**new_kv, "pos": pos, "seg": seg, "index": idx + tokens_BxL.shape[1]}
    return x, new_cache

  def logits(self, hidden_BxLxD: Array) -> Array:
    """Full f32 logits; for sampling and tests. Training uses logprobs.token_stats instead."""
    w = self.unembedding().astype(hidden_BxLxD.dtype)
    return jnp.einsum("bld,dv->blv", hidden_BxLxD, w, preferred_element_type=jnp.float32)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict:
  """An empty KV cache for `length` slots."""
  dtype = dtype or cfg.dtype
  shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.dim_per_head)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "pos": jnp.zeros((batch, length), jnp.int32),
          "seg": jnp.zeros((batch, length), jnp.int32),
          "index": jnp.zeros((), jnp.int32)}
