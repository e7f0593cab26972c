"""Decoder building blocks: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Einsum legend: B batch, L query length, S key length, D hidden, H query heads, K kv heads,
G = H // K query heads per kv head, Dh head dim, F MLP width, V vocab.

Every weight carries logical axis names (`sharding_names`); dpo_jax.sharding maps them to mesh
axes. Activations are constrained with `sharding.constrain(x, names)`.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax import sharding
from dpo_jax.models.config import ModelConfig

Array = jax.Array


def param(rngs: nnx.Rngs, init, shape, names, dtype) -> nnx.Param:
  """A parameter with logical axis names; placement is decided later by the mesh rules."""
  return nnx.Param(init(rngs.params(), shape, dtype), sharding_names=names, eager_sharding=False)


def dense_init(std: float = 0.02):
  return jax.nn.initializers.normal(std)


class Weight(nnx.Module):
  """A module holding one named weight (embed_tokens.embedding, lm_head.kernel)."""

  def __init__(self, name: str, shape, names, cfg: ModelConfig, rngs: nnx.Rngs):
    setattr(self, name, param(rngs, dense_init(), shape, names, cfg.param_dtype))


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, cfg: ModelConfig, rngs: nnx.Rngs):
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ("norm",), cfg.param_dtype)
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    # Statistics in f32, and the scale multiplies the normalised input in the wider of the two
    # dtypes, as transformers does (f32 master weights: the scale's gradient sums over every
    # token in f32).
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.scale[...] * y.astype(x.dtype)).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (the "rotate half" layout of transformers).
# ---------------------------------------------------------------------------------------------


def rope_inv_freq(cfg: ModelConfig) -> Array:
  dh = cfg.dim_per_head
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  if not cfg.rope_scaling:
    return inv
  s = dict(cfg.rope_scaling)   # Llama 3: long wavelengths slowed by `factor`, smooth in between.
  factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
  old_len = s["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv
  scaled = jnp.where(wavelen > old_len / lo, inv / factor, inv)
  smooth = (old_len / wavelen - lo) / (hi - lo)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
  return jnp.where(medium, smoothed, scaled)


def apply_rope(x_BxLxNxDh: Array, positions_BxL: Array, inv_freq: Array) -> Array:
  freqs = positions_BxL.astype(jnp.float32)[..., None] * inv_freq          # [B, L, Dh/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]             # [B, L, 1, Dh]
  cos, sin = jnp.cos(emb).astype(x_BxLxNxDh.dtype), jnp.sin(emb).astype(x_BxLxNxDh.dtype)
  x1, x2 = jnp.split(x_BxLxNxDh, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x_BxLxNxDh * cos + rotated * sin


# ---------------------------------------------------------------------------------------------
# Attention.
# ---------------------------------------------------------------------------------------------


# Segment ids at or above BRANCH are branches of a shared prefix (prompt sharing, see
# data/packing.py): segment s + j·BRANCH (j ≥ 1) also sees segment s, and nothing else outside
# itself. Ids below BRANCH are ordinary segments (s % BRANCH == s), so this is a no-op for them.
BRANCH = 1 << 20

# The name scope of the attention core (mask, scores, softmax, weighted values; not the
# projections): XLA op names carry it, so profiles can tell attention from the rest.
ATTENTION_SCOPE = "attention_core"


def attention_mask(q_pos: Array, q_seg: Array, kv_pos: Array, kv_seg: Array,
                   window: Optional[int]) -> Array:
  """[B, L, S] boolean mask: same segment (or kv in the shared prefix segment of q's branch),
  kv not padding, causal by position, optional window.

  Within a segment positions increase by one per token, so a position-based causal mask is the
  index-based one; it also serves packed rows (positions restart per segment), the KV cache,
  and prompt-shared rows [prompt | chosen | rejected] whose branches both continue the prompt's
  positions.
  """
  q, kv = q_seg[:, :, None], kv_seg[:, None, :]
  mask = ((q == kv) | (kv == q % BRANCH)) & (kv != 0)
  delta = q_pos[:, :, None] - kv_pos[:, None, :]
  mask &= delta >= 0
  if window is not None:
    mask &= delta < window
  return mask


def dot_product_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS) -> Array:
  b, l, h, dh = q_BxLxHxDh.shape
  k_heads = k_BxSxKxDh.shape[2]
  q = q_BxLxHxDh.reshape(b, l, k_heads, h // k_heads, dh)
  scores = jnp.einsum("blkgd,bskd->bkgls", q, k_BxSxKxDh,
                      preferred_element_type=jnp.float32) / math.sqrt(dh)
  scores = jnp.where(mask_BxLxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxDh.dtype)
  out = jnp.einsum("bkgls,bskd->blkgd", probs, v_BxSxKxDh)
  return out.reshape(b, l, h, dh)


def chunked_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, positions, segment_ids,
                      window: Optional[int], chunk: int) -> Array:
  """Self-attention without a cache, in query chunks of `chunk` positions.

  Query chunk [s, e) attends only to keys [0, e): every key a query may see comes no later in
  the row than the query itself (causal within a segment; packed segments and the branches of
  a shared prompt are laid out in order), so the result equals dot_product_attention over the
  full mask, while the masked blocks above the diagonal are never computed (about half of the
  attention FLOPs for long rows). Each chunk is rematerialised: with scanned layers the
  backward recomputes its [c, e] scores instead of keeping about half of [L, L] (measured with
  remat=none: less memory and a faster step than keeping them). With unrolled layers
  (model.scan_layers=False) XLA merges the recomputation into the forward: the same program as
  without the checkpoint.
  """
  length = q_BxLxHxDh.shape[1]

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def block(q, k, v, q_pos, q_seg, kv_pos, kv_seg):
    return dot_product_attention(q, k, v, attention_mask(q_pos, q_seg, kv_pos, kv_seg, window))

  outs = []
  for s in range(0, length, chunk):
    e = min(s + chunk, length)
    outs.append(block(q_BxLxHxDh[:, s:e], k_BxLxKxDh[:, :e], v_BxLxKxDh[:, :e],
                      positions[:, s:e], segment_ids[:, s:e], positions[:, :e],
                      segment_ids[:, :e]))
  return jnp.concatenate(outs, axis=1)


def library_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, mask_BxLxL,
                      implementation: str) -> Array:
  """Self-attention without a cache through jax.nn.dot_product_attention ('xla' or 'cudnn').

  is_causal is index-based, which here is implied by the position-based mask: every key a
  query may see comes no later in the row (as for chunked_attention). It lets cuDNN's flash
  kernel skip the blocks above the diagonal. The layout mask (padding, packed segments,
  shared-prompt branches, sliding window) carries the rest; cuDNN adds it as a [B, 1, L, L]
  bias. The window is not passed as local_window_size: that is index-based, and a shared
  prompt's rejected branch sees prompt tokens further back in the row than in its sequence.
  """
  with _no_mask_bias_gradient() if implementation == "cudnn" else contextlib.nullcontext():
    return jax.nn.dot_product_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh,
                                        mask=mask_BxLxL[:, None], is_causal=True,
                                        implementation=implementation)


@contextlib.contextmanager
def _no_mask_bias_gradient():
  """While tracing jax's cuDNN attention: no gradient for the bias it builds from our mask.

  jax (0.10.2, the pinned version) turns a boolean mask into an additive bias and always has
  cuDNN's backward return that bias's gradient: a [B, 1, L, L] tensor that no caller can use
  (a mask is not differentiable): the flash backward then writes each row's [L, L] score
  gradient, summed over heads, to memory. Upstream fixed this in jax-ml/jax#39512 ("Skip cudnn
  attention dbias computation for constant boolean masks"), which 0.10.2 does not have.
  dpo_jax never passes a bias of its own, so the bias gradient is never wanted. The switch is
  jax's module-level should_export_dbias, read once per traced call and restored afterwards
  (not thread-safe: another thread tracing cuDNN attention with a bias of its own meanwhile
  would lose that bias's gradient). A jax without the function is left as it is.
  """
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention   # noqa: PLC0415
  saved = getattr(cudnn_attention, "should_export_dbias", None)
  if saved is None:
    yield
    return
  cudnn_attention.should_export_dbias = lambda *args, **kwargs: False
  try:
    yield
  finally:
    cudnn_attention.should_export_dbias = saved


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, k, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
    self.q_proj = Proj((d, h, dh), ("embed", "heads", "head_dim"), cfg.attention_bias, cfg, rngs)
    self.k_proj = Proj((d, k, dh), ("embed", "kv_heads", "head_dim"), cfg.attention_bias, cfg,
                       rngs)
    self.v_proj = Proj((d, k, dh), ("embed", "kv_heads", "head_dim"), cfg.attention_bias, cfg,
                       rngs)
    self.o_proj = Proj((h, dh, d), ("heads", "head_dim", "embed"), False, cfg, rngs, n_in=2)
    self.cfg = cfg

  def __call__(self, x_BxLxD, positions, segment_ids, inv_freq, cache=None):
    """Returns the attention output and, when decoding with a cache, the updated cache.

    cache: dict(k=[B,S,K,Dh], v=[B,S,K,Dh], pos=[B,S], seg=[B,S], index=scalar) or None.
    """
    cfg = self.cfg
    q = apply_rope(self.q_proj(x_BxLxD), positions, inv_freq)      # [B, L, H, Dh]
    k = apply_rope(self.k_proj(x_BxLxD), positions, inv_freq)      # [B, L, K, Dh]
    v = self.v_proj(x_BxLxD)
    q = sharding.constrain(q, ("batch", "length", "act_heads", None))
    if cache is None:
      kv_pos, kv_seg, new_cache = positions, segment_ids, None
    else:
      idx = cache["index"]
      k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), idx, 1)
      v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), idx, 1)
      kv_pos, kv_seg = cache["pos"], cache["seg"]
      new_cache = {"k": k, "v": v}
    with jax.named_scope(ATTENTION_SCOPE):   # op names for benchmarks/op_profile.py
      if cache is None and 0 < cfg.attention_chunk < q.shape[1]:
        out = chunked_attention(q, k, v, positions, segment_ids, cfg.sliding_window,
                                cfg.attention_chunk)
      else:
        mask = attention_mask(positions, segment_ids, kv_pos, kv_seg, cfg.sliding_window)
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        if cache is None and cfg.attention_impl != "einsum":
          out = library_attention(q, k, v, mask, cfg.attention_impl)
        else:
          out = dot_product_attention(q, k, v, mask)
    return self.o_proj(out), new_cache


class Proj(nnx.Module):
  """A projection whose kernel keeps head structure, e.g. [D, H, Dh], for tensor parallelism.

  The first `n_in` kernel dims are contracted with the last `n_in` dims of x. The product is one
  2-D matmul [tokens, in] @ [in, out]: its weight gradient then contracts a single dimension,
  which CPU backends run about twice as fast as the 3-D einsum (benchmarks/README.md).
  """

  def __init__(self, shape, names, use_bias: bool, cfg: ModelConfig, rngs: nnx.Rngs,
               n_in: int = 1):
    self.kernel = param(rngs, dense_init(), shape, names, cfg.param_dtype)
    self.bias = (param(rngs, jax.nn.initializers.zeros, shape[n_in:], names[n_in:],
                       cfg.param_dtype) if use_bias else None)
    self.dtype = cfg.dtype
    self.n_in = n_in

  def __call__(self, x):
    k = self.kernel[...].astype(self.dtype)
    in_shape, out_shape = k.shape[:self.n_in], k.shape[self.n_in:]
    lead = x.shape[:x.ndim - self.n_in]
    y = jnp.dot(x.astype(self.dtype).reshape(-1, math.prod(in_shape)),
                k.reshape(math.prod(in_shape), math.prod(out_shape)))
    y = y.reshape(*lead, *out_shape)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = Proj((d, f), ("embed", "mlp"), False, cfg, rngs)
    self.up_proj = Proj((d, f), ("embed", "mlp"), False, cfg, rngs)
    self.down_proj = Proj((f, d), ("mlp", "embed"), False, cfg, rngs)

  def __call__(self, x_BxLxD):
    h = jax.nn.silu(self.gate_proj(x_BxLxD)) * self.up_proj(x_BxLxD)    # [B, L, F]
    h = sharding.constrain(h, ("batch", "length", "act_mlp"))
    return self.down_proj(h)


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, rngs)
    self.self_attn = Attention(cfg, rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, segment_ids, inv_freq, cache=None):
    h, new_cache = self.self_attn(self.input_layernorm(x), positions, segment_ids, inv_freq,
                                  cache)
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return sharding.constrain(x, ("batch", "length", "act_embed")), new_cache


REMAT_POLICIES = {
    # Recompute everything in the backward pass except the layer inputs (least memory).
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep matmul outputs without batch dims (weights-stationary dots), recompute the rest.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Save everything: fastest backward, most memory.
    "none": None,
}
