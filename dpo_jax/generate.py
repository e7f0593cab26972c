"""Sampling with a KV cache: greedy, temperature, top-k, top-p; batched prompts; EOS stop.

    out = generate.sample(cfg, params, [[1, 5, 9], [1, 7]], max_new_tokens=32,
                          temperature=0.7, top_p=0.9, eos_id=2, seed=0, return_logps=True)
    out["tokens"]   # [[...], [...]] generated ids per prompt, cut after the first EOS
    out["lengths"]  # np.int32 [B]: len(tokens[b])
    out["logps"]    # np.float32 [B]: Σ log p_model(token) over the generated tokens
    out["finished"] # np.bool_ [B]: the row emitted EOS (else it ran out of max_new_tokens)
    out["token_array"]  # np.int32 [B, max_new_tokens]: the same, pad_id after EOS

    generate.generate_text(cfg, params, tokenizer, ["Hello", [{"role": "user", ...}]], ...)

Design (shapes: B batch, P padded prompt length, N max_new_tokens, V vocab, S = P + N - 1):

- Prompts are LEFT-padded to P, the prompt length rounded up to a power of two (at least
  MIN_PROMPT_BUCKET), so prompts of any length share a few compiled programs. Padding slots have
  segment id 0 (never attended, see layers.attention_mask); positions count from 0 at each
  prompt's first real token, so a row's result does not depend on how much it was padded.
- ONE jax.jit program per (cfg, B, P, N, mode, mesh): a prefill forward over the padded prompts
  writes cache slots [0, P) and gives the first token's logits (left padding puts every row's last
  prompt token in column P-1); then a jax.lax.while_loop does one single-token forward per step,
  writing slot P + i - 1 at step i. The loop stops early once every row has emitted EOS (or after
  N tokens). The compiled function is built by `decode_fn` (lru-cached per static config; jax.jit
  caches per shapes), so repeated calls with the same shapes never recompile.
- Sampling follows transformers' warpers, in its order: temperature -> top-k -> top-p. top-k keeps
  every logit >= the k-th largest (ties kept, as transformers does); top-p keeps the smallest
  prefix of the sorted distribution whose probability reaches p (a token is kept when the mass
  strictly before it is < p; the most likely token is always kept); tokens tied with the last
  kept logit are kept too. Greedy is argmax of the raw logits. temperature == 0 means greedy.
  temperature, top_k, top_p, eos_id, pad_id and seed are traced arguments: changing them does not
  recompile (only greedy vs sampling, filtering on/off, and the number of stop ids are
  compile-time).
- Randomness: jax.random.key(seed), folded with the step number; one categorical draw per step
  over the whole batch. Deterministic for a given (seed, prompts batch); a row's sample depends on
  the other rows of its batch only through the batch size / order of the draw.
- EOS: any of the stop ids (eos_id: one or several) ends a row. The EOS token IS included in a
  row's tokens, its length and its log-prob sum (as in the preference data, where a string
  completion ends with a scored EOS). After EOS the row emits pad_id and stops accumulating
  log-probs; `tokens` are cut after the EOS.
- log-probs are under the untempered, unfiltered model distribution (log_softmax of the raw
  f32 logits), i.e. what dpo_jax's scoring computes for the same completion.
- Sharding: params may be plain (one device) or placed on a mesh (e.g. load.load_params). With
  `mesh=`, prompts are split over the batch axes (the batch is padded with filler rows to a
  multiple of the batch shards; they are dropped from the result), the KV cache is constrained
  to the batch / kv_heads axes, and the model's activation constraints are active.
- Memory: the cache holds all S slots per row, also for sliding-window models (the window is
  applied by the attention mask, not by a ring buffer).
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import sharding
from dpo_jax.data import preference
from dpo_jax.models import core
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.llama import init_cache

Array = jax.Array

MIN_PROMPT_BUCKET = 16
CACHE_NAMES = ("layers", "batch", "length", "kv_heads", "head_dim")


def prompt_bucket(n: int) -> int:
  """The padded prompt length: the next power of two >= n, at least MIN_PROMPT_BUCKET."""
  return max(MIN_PROMPT_BUCKET, 1 << max(0, n - 1).bit_length())


# ---------------------------------------------------------------------------------------------
# Choosing the next token.
# ---------------------------------------------------------------------------------------------


def filter_logits(logits_BxV: Array, top_k, top_p) -> Array:
  """Top-k then top-p (nucleus) filtering: removed entries become -inf. f32 in, f32 out.

  top_k <= 0 (or >= V) keeps all; top_p >= 1 keeps all. Both may be traced scalars.
  """
  v = logits_BxV.shape[-1]
  neg_inf = jnp.float32(-jnp.inf)
  desc = -jnp.sort(-logits_BxV, axis=-1)                                # [B, V] descending
  k = jnp.where((top_k <= 0) | (top_k > v), v, top_k).astype(jnp.int32)
  kth = jnp.take_along_axis(desc, jnp.broadcast_to(k - 1, desc.shape[:-1])[..., None], -1)
  desc = jnp.where(desc >= kth, desc, neg_inf)                          # top-k (ties kept)
  probs = jax.nn.softmax(desc, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs                           # mass strictly before
  keep = (before < top_p) | (top_p >= 1) | (jnp.arange(v) == 0)
  keep &= desc > neg_inf
  n_keep = jnp.sum(keep, axis=-1, keepdims=True)                        # keep is a prefix
  threshold = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
  return jnp.where(logits_BxV >= threshold, logits_BxV, neg_inf)


def choose(logits_BxV: Array, key, *, greedy: bool, filtered: bool, temperature, top_k,
           top_p) -> tuple[Array, Array]:
  """(next token [B] int32, its log-prob under the raw model distribution [B] f32)."""
  logits = logits_BxV.astype(jnp.float32)
  if greedy:
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  else:
    # from the max: a tiny temperature sends the others to -inf, not every logit to +-inf
    scaled = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
    if filtered:
      scaled = filter_logits(scaled, top_k, top_p)
    tok = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], -1)[:, 0]
  return tok, logp


# ---------------------------------------------------------------------------------------------
# The compiled decoder.
# ---------------------------------------------------------------------------------------------


def decode_fn(cfg: ModelConfig, max_new_tokens: int, greedy: bool, filtered: bool,
              mesh: Optional[jax.sharding.Mesh] = None, rules: Optional[tuple] = None):
  """The jitted fn(params, tokens, positions, segment_ids, prompt_lens, seed, temperature,
  top_k, top_p, eos_id, pad_id) -> (out [B, N], lengths [B], logps [B], finished [B]).
  eos_id is an int32 array [E] of stop ids (-1 entries match nothing).

  tokens/positions/segment_ids: [B, P] left-padded prompts; prompt_lens [B]. One compiled
  program per input shapes (jax.jit's cache; see `_cache_size()`). Built once per static
  config (cfg, max_new_tokens, greedy, filtered, mesh, rules) and cached.
  """
  if mesh is not None and rules is None:
    rules = sharding.DEFAULT_RULES
  return _decode_fn(cfg, int(max_new_tokens), bool(greedy), bool(filtered), mesh,
                    None if rules is None else tuple(rules))


@functools.lru_cache(maxsize=64)
def _decode_fn(cfg, max_new_tokens, greedy, filtered, mesh, rules):
  graphdef = core.split(cfg)[0]
  n = int(max_new_tokens)
  if n < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")

  def constrain_cache(cache):
    if mesh is None:
      return cache
    out = dict(cache)
    for name in ("k", "v"):
      spec = sharding.logical_to_spec(CACHE_NAMES, cache[name].shape, mesh, rules)
      out[name] = jax.lax.with_sharding_constraint(
          cache[name], jax.sharding.NamedSharding(mesh, spec))
    return out

  def run(params, tokens, positions, segment_ids, prompt_lens, seed, temperature, top_k,
          top_p, eos_id, pad_id):
    model = core.merge(graphdef, params)
    b, p = tokens.shape
    key = jax.random.key(seed)
    pick = functools.partial(choose, greedy=greedy, filtered=filtered,
                             temperature=temperature, top_k=top_k, top_p=top_p)

    def record(i, tok, logp, state):
      out, lengths, logps, done = state
      live = ~done
      tok = jnp.where(live, tok, pad_id)
      out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i, 1)
      logps = logps + jnp.where(live, logp, 0.0)
      lengths = lengths + live.astype(jnp.int32)
      done = done | (live & jnp.any(tok[:, None] == eos_id[None, :], axis=-1))
      return out, lengths, logps, done

    # Prefill: slots [0, P).
    cache = constrain_cache(init_cache(cfg, b, p + n - 1))
    hidden, cache = model(tokens, positions, segment_ids, cache)
    logits = model.logits(hidden[:, -1:])[:, 0]
    tok, logp = pick(logits, jax.random.fold_in(key, 0))
    state = (jnp.full((b, n), pad_id, jnp.int32), jnp.zeros((b,), jnp.int32),
             jnp.zeros((b,), jnp.float32), jnp.zeros((b,), bool))
    state = record(0, tok, logp, state)

    # Decode: step i feeds token i-1 (position prompt_len + i - 1, slot P + i - 1).
    def cond(carry):
      i, _, state = carry
      return (i < n) & ~jnp.all(state[3])

    def body(carry):
      i, cache, state = carry
      prev = jax.lax.dynamic_slice_in_dim(state[0], i - 1, 1, 1)        # [B, 1]
      pos = (prompt_lens + i - 1)[:, None]
      hidden, cache = model(prev, pos, jnp.ones_like(prev), cache)
      cache = constrain_cache(cache)
      tok, logp = pick(model.logits(hidden)[:, 0], jax.random.fold_in(key, i))
      return i + 1, cache, record(i, tok, logp, state)

    _, _, (out, lengths, logps, done) = jax.lax.while_loop(
        cond, body, (jnp.int32(1), cache, state))
    return out, lengths, logps, done

  if mesh is not None:
    inner = run

    def run(*args):   # noqa: F811 (the activation constraints need the rules while tracing)
      with sharding.use_rules(mesh, rules):
        return inner(*args)

  return jax.jit(run)


def _batch_shards(mesh, rules) -> int:
  spec = sharding.logical_to_spec(("batch",), None, mesh, rules)[0]
  if spec is None:
    return 1
  axes = (spec,) if isinstance(spec, str) else spec
  return int(np.prod([mesh.shape[a] for a in axes]))


def stop_list(eos_id) -> list[int]:
  """eos_id (None, an int or ints) as a non-empty list for the decoder (-1 matches nothing)."""
  if eos_id is None:
    return [-1]
  ids = [int(eos_id)] if isinstance(eos_id, (int, np.integer)) else [int(i) for i in eos_id]
  return ids or [-1]


def stop_ids(cfg: ModelConfig, tokenizer, generation_config: Optional[dict] = None
             ) -> tuple[int, ...]:
  """Every id that ends a response: the tokenizer's EOS, the model config's EOS id(s) (a Llama 3
  Instruct config lists <|end_of_text|> and <|eot_id|>, its tokenizer names one) and those of
  the model's generation_config.json (load.generation_config), as transformers' generate stops."""
  ids = [tokenizer.eos_token_id]
  for eos in (cfg.eos_token_id, (generation_config or {}).get("eos_token_id")):
    ids += list(eos) if isinstance(eos, (tuple, list)) else [eos]
  return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
  """(tokens, positions, segment_ids) [B, length] int32 with each prompt right-aligned."""
  b = len(prompts)
  tokens = np.full((b, length), pad_id, np.int32)
  positions = np.zeros((b, length), np.int32)
  segment_ids = np.zeros((b, length), np.int32)
  for r, prompt in enumerate(prompts):
    m = len(prompt)
    tokens[r, length - m:] = prompt
    positions[r, length - m:] = np.arange(m)
    segment_ids[r, length - m:] = 1
  return tokens, positions, segment_ids


def sample(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
           eos_id: int | Sequence[int] | None = None, pad_id: int = 0, seed: int = 0,
           greedy: bool = False,
           return_logps: bool = False, mesh: Optional[jax.sharding.Mesh] = None,
           rules: Optional[tuple] = None) -> dict[str, Any]:
  """Continues each prompt (a list of token ids) by up to max_new_tokens tokens.

  Returns {"tokens": [list[int]] (cut after the first EOS, EOS included), "lengths": int32 [B],
  "finished": bool [B] (emitted EOS), and with return_logps "logps": f32 [B] (summed log-probs of
  the returned tokens under the untempered, unfiltered model), "token_array": int32 [B, N] (the
  same tokens, pad_id after EOS)}. eos_id: one stop id, several (any of them ends a row: Llama 3
  Instruct's <|end_of_text|> and <|eot_id|>), or None. See the module docstring.
  """
  prompts = [list(map(int, p)) for p in prompts]
  if not prompts:
    raise ValueError("sample: no prompts")
  for i, p in enumerate(prompts):
    if not p:
      raise ValueError(f"sample: prompt {i} is empty (give at least one token, e.g. BOS)")
    if min(p) < 0 or max(p) >= cfg.vocab_size:
      raise ValueError(f"sample: prompt {i} has token ids outside [0, {cfg.vocab_size})")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if not 0 <= pad_id < cfg.vocab_size:
    raise ValueError(f"pad_id={pad_id} must be a token id in [0, {cfg.vocab_size})")
  if not (temperature >= 0 and np.isfinite(temperature)):
    raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0, got {top_k}")
  longest = max(map(len, prompts)) + max_new_tokens
  if longest > cfg.max_position_embeddings:   # rope computes them; the model never saw them
    warnings.warn(f"sample: a prompt and its {max_new_tokens} new tokens reach position "
                  f"{longest}, past the model's max_position_embeddings="
                  f"{cfg.max_position_embeddings}", stacklevel=2)
  greedy = bool(greedy or temperature == 0)
  filtered = (not greedy) and (0 < top_k < cfg.vocab_size or top_p < 1.0)

  b = len(prompts)
  if mesh is not None:
    rules = tuple(rules) if rules is not None else sharding.DEFAULT_RULES
    shards = _batch_shards(mesh, rules)
    prompts = prompts + [prompts[0]] * (-b % shards)   # filler rows, dropped below
  arrays = left_pad(prompts, prompt_bucket(max(map(len, prompts))), pad_id)
  lens = np.asarray([len(p) for p in prompts], np.int32)
  if mesh is not None:
    row = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(
        ("batch", None), arrays[0].shape, mesh, rules))
    arrays = tuple(jax.device_put(a, row) for a in arrays)
    lens = jax.device_put(lens, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(row.spec[0])))
  fn = decode_fn(cfg, int(max_new_tokens), greedy, filtered, mesh, rules)
  scalars = (np.uint32(seed % 2**32), np.float32(temperature if not greedy else 1.0),
             np.int32(top_k), np.float32(top_p), np.asarray(stop_list(eos_id), np.int32),
             np.int32(pad_id))
  out, lengths, logps, finished = sharding.to_host(fn(params, *arrays, lens, *scalars))
  out, lengths, logps, finished = out[:b], lengths[:b], logps[:b], finished[:b]
  result = {"tokens": [out[r, :lengths[r]].tolist() for r in range(b)],
            "lengths": np.asarray(lengths, np.int32), "finished": np.asarray(finished, bool),
            "token_array": np.asarray(out, np.int32)}
  if return_logps:
    result["logps"] = np.asarray(logps, np.float32)
  return result


# ---------------------------------------------------------------------------------------------
# Text in, text out.
# ---------------------------------------------------------------------------------------------


def encode_prompt(tokenizer, prompt, add_bos: bool = True) -> list[int]:
  """A prompt's ids exactly as dpo_jax.data.preference tokenises prompts for training.

  Strings: [BOS] (if add_bos and the tokenizer has one) + encode(text, no special tokens).
  Chat messages: apply_chat_template(add_generation_prompt=True) rendered to text, then encoded
  without special tokens (the template adds its own).
  """
  return list(preference.encode_prompt(tokenizer, prompt, add_bos))


def generate_text(cfg: ModelConfig, params, tokenizer, prompts: Sequence, *,
                  max_new_tokens: int, add_bos: bool = True,
                  eos_id: int | Sequence[int] | None = -1,
                  generation_config: Optional[dict] = None,
                  pad_id: Optional[int] = None, **kw) -> dict[str, Any]:
  """sample() on text prompts (strings or lists of chat messages); adds "text" (decoded with
  skip_special_tokens=True) and "prompt_tokens". eos_id defaults (-1) to stop_ids(cfg,
  tokenizer, generation_config), where generation_config is the model's generation_config.json
  (load.generation_config); pass None to never stop early. pad_id defaults to the tokenizer's
  pad (else EOS, else 0). Other keyword arguments go to sample().
  """
  if eos_id == -1:
    eos_id = stop_ids(cfg, tokenizer, generation_config)
  if pad_id is None:
    pad_id = preference.pad_id(tokenizer)
  ids = preference.encode_prompts(tokenizer, prompts, add_bos)
  out = sample(cfg, params, ids, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
               **kw)
  out["prompt_tokens"] = ids
  out["text"] = [tokenizer.decode(t, skip_special_tokens=True) for t in out["tokens"]]
  return out
