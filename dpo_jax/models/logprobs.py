"""Per-token log-probs in f32 without materialising full [B, L, V] f32 logits.

The sequence is cut into chunks of `chunk` positions; each chunk's logits [B, chunk, V] are made,
reduced to per-token statistics and dropped. The chunk body is rematerialised, so the backward
pass recomputes one chunk's logits at a time instead of keeping all of them.

Only scored positions need logits. A batch with a score_index (data/preference.add_score_index)
is first narrowed to the K completion positions of each row (scoring_view): prompt and padding
positions never reach the [D, V] unembedding, forward or backward.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

STATS = ("logsumsq", "entropy")


def dot2d(h_BxCxD: Array, w_DxV: Array) -> Array:
  """[B, C, D] @ [D, V] -> f32 [B, C, V] as one 2-D matmul (one contracting dim in the weight
  gradient, which CPU backends run much faster than the 3-D einsum)."""
  b, c, d = h_BxCxD.shape
  out = jnp.dot(h_BxCxD.reshape(b * c, d), w_DxV, preferred_element_type=jnp.float32)
  return out.reshape(b, c, -1)


def token_stats(hidden_BxLxD: Array, unembed_DxV: Array, tokens_BxL: Array, *,
                chunk: int = 256, stats: tuple[str, ...] = (),
                teacher: tuple[Array, Array] | None = None,
                source_BxL: Array | None = None) -> dict[str, Array]:
  """Statistics of predicting tokens[t] from position t-1, aligned with tokens ([B, L], f32).

  source_BxL (optional): the position whose hidden state predicts tokens[t], per row; None means
  t-1. Prompt-shared rows [prompt | chosen | rejected] need it: the first rejected token is
  predicted from the last prompt token, not from the last chosen one (data/packing.py).

  Always: "logp" = log p(tokens[t] | tokens[<t]) and "logit_mean" = mean logit over the vocab.
  Optional (`stats`): "logsumsq" = log Σ_v p_v² (WPO), "entropy" = −Σ_v p_v log p_v.
  With teacher = (teacher hidden [B, L, D_te], teacher unembedding [D_te, V_te]) also
  "teacher_kl" = KL(p_te ‖ p) = Σ_v p_te,v (log p_te,v − log p_v) per position (daDPO's
  token-level distillation), computed chunk by chunk like the rest; the teacher's side carries
  no gradient. When V_te ≠ V (an embedding padded past the tokenizer, e.g. Qwen2.5-7B's 152,064
  rows against 1.5B's 151,936), p_te is the teacher's distribution over the shared ids
  [0, min(V, V_te)), renormalised there; p is the student's over its whole vocabulary.
  Position 0 (no predecessor) is 0.
  """
  unknown = set(stats) - set(STATS)
  if unknown:
    raise ValueError(f"unknown token statistics {sorted(unknown)}; known: {STATS}")
  if source_BxL is not None:   # row h[t] predicts tokens[t]: no shift at the end
    gather = lambda x: jnp.take_along_axis(x, source_BxL[..., None], axis=1)
    hidden_BxLxD, targets = gather(hidden_BxLxD), tokens_BxL
    if teacher is not None:
      teacher = (gather(teacher[0]), teacher[1])
  else:
    targets = jnp.roll(tokens_BxL, -1, axis=1)          # position t predicts token t+1
  b, length, d = hidden_BxLxD.shape
  n = -(-length // max(1, min(chunk, length)))   # chunks of at most `chunk` positions,
  c = -(-length // n)                            # as equal as possible: little padding
  pad = n * c - length
  h = jnp.pad(hidden_BxLxD, ((0, 0), (0, pad), (0, 0)))
  t = jnp.pad(targets, ((0, 0), (0, pad)))
  h = h.reshape(b, n, c, d).swapaxes(0, 1)              # [n, B, c, D]
  t = t.reshape(b, n, c).swapaxes(0, 1)
  w = unembed_DxV.astype(hidden_BxLxD.dtype)
  xs = (h, t)
  if teacher is not None:
    h_te, w_te = jax.lax.stop_gradient(teacher[0]), jax.lax.stop_gradient(teacher[1])
    h_te = jnp.pad(h_te, ((0, 0), (0, pad), (0, 0)))
    xs = (h, t, h_te.reshape(b, n, c, h_te.shape[-1]).swapaxes(0, 1))
    shared = min(w.shape[-1], w_te.shape[-1])
    w_te = w_te[:, :shared].astype(h_te.dtype)

  @jax.checkpoint
  def body(_, xs):
    h_c, t_c = xs[:2]
    logits = dot2d(h_c, w)
    lse = jax.nn.logsumexp(logits, axis=-1)
    out = {"logp": jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0] - lse}
    if "logsumsq" in stats:
      out["logsumsq"] = jax.nn.logsumexp(2 * logits, axis=-1) - 2 * lse
    if "entropy" in stats:
      out["entropy"] = lse - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)
    if teacher is not None:
      logp_te = jax.nn.log_softmax(dot2d(xs[2], w_te), axis=-1)
      logp = logits[..., :shared] - lse[..., None]
      out["teacher_kl"] = jnp.sum(jnp.exp(logp_te) * (logp_te - logp), axis=-1)
    return None, out

  _, out = jax.lax.scan(body, None, xs)
  out = {k: v.swapaxes(0, 1).reshape(b, n * c)[:, :length] for k, v in out.items()}
  # The mean logit is linear in h: no need for the logits themselves. Metric only.
  out["logit_mean"] = jax.lax.stop_gradient(
      jnp.einsum("bld,d->bl", hidden_BxLxD, w.sum(-1), preferred_element_type=jnp.float32)
      / w.shape[-1])
  if source_BxL is not None:
    return out
  # Shift right by one so that statistics line up with the predicted token.
  return {k: jnp.pad(v[:, :-1], ((0, 0), (1, 0))) for k, v in out.items()}


def sequence_logps(model, batch: dict, *, chunk: int = 256, stats: tuple[str, ...] = (),
                   tokens: bool = False, teacher=None) -> dict[str, Array]:
  """Per-sequence sums over completion tokens, [S] each (S = 2 × batch["valid"].size).

  Rows may hold one sequence each, several packed ones, or a prompt shared by both completions
  of a pair: tokens are assigned to sequences by batch["seq_index"] (and, when present, to the
  hidden state that predicts them by batch["source"]), so one reduction serves every layout.
  Returns
    logps: Σ log p over completion tokens    lens: completion token count
    logit_sum: Σ over completion tokens of the mean logit (for TRL's logits/* metrics)
    <stat>: Σ of each requested statistic (see token_stats; "teacher_kl" with `teacher`)
    with tokens=True also "tokens/logp" and "tokens/<stat>": per-token values [S, L],
            left-aligned (token k of each completion at column k, zero beyond its length).
  """
  hidden, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"])
  tok = batch_token_stats(hidden, model.unembedding(), batch, chunk=chunk, stats=stats,
                          teacher=teacher)
  return reduce_sequences(tok, batch, with_tokens=tokens)


def batch_token_stats(hidden_BxLxD: Array, unembed_DxV: Array, batch: dict, **kwargs):
  """token_stats for the rows of a batch (its tokens, and its `source` in any layout), at its
  scored positions only when it has a score_index (scoring_view)."""
  view = scoring_view(batch)
  return token_stats(hidden_BxLxD, unembed_DxV, view["tokens"],
                     source_BxL=view.get("source"), **kwargs)


def scoring_view(batch: dict) -> dict:
  """The batch restricted to its scored positions, when it carries batch["score_index"] [R, K]
  (data/preference.add_score_index): tokens, loss_mask and seq_index at those K positions per
  row, and `source`, the position whose hidden state predicts each. Prompt and padding positions
  never reach the unembedding. K positions past the row (index L) read as unscored padding.
  Without a score_index the batch is returned as it is. Everything downstream (token_stats,
  reduce_sequences, left_align) reads only these keys, so both views give the same sums. Other
  per-position keys ([R, L]: positions, segment_ids) are left out of the view rather than left
  misaligned with it; per-row and per-example keys are kept.
  """
  index = batch.get("score_index")
  if index is None:
    return batch
  take = lambda x: jnp.take_along_axis(x, index, axis=1, mode="fill", fill_value=0)
  source = batch.get("source")
  rows_x_length = batch["tokens"].shape
  view = {k: v for k, v in batch.items()
          if k != "score_index" and tuple(jnp.shape(v)[:2]) != rows_x_length}
  view.update(tokens=take(batch["tokens"]), loss_mask=take(batch["loss_mask"]),
              seq_index=take(batch["seq_index"]),
              source=take(source) if source is not None else jnp.maximum(index - 1, 0))
  return view


def reduce_sequences(tok: dict[str, Array], batch: dict, with_tokens: bool = False):
  """Per-sequence sums of token statistics `tok` (from batch_token_stats on the same batch)."""
  length = batch["tokens"].shape[1]
  batch = scoring_view(batch)
  n = 2 * batch["valid"].shape[0]
  mask = batch["loss_mask"].astype(jnp.float32)
  seq = batch["seq_index"].reshape(-1)

  def ssum(x):
    return jax.ops.segment_sum((x * mask).reshape(-1), seq, num_segments=n)

  out = {k: ssum(v) for k, v in tok.items() if k not in ("logp", "logit_mean")}
  out.update(logps=ssum(tok["logp"]), lens=ssum(jnp.ones_like(mask)),
             logit_sum=ssum(tok["logit_mean"]))
  if with_tokens:
    for k, v in tok.items():
      if k != "logit_mean":
        out[f"tokens/{k}"] = left_align(v, batch, length)
  return out


def left_align(x_RxL: Array, batch: dict, length: int | None = None) -> Array:
  """Completion-token values per sequence, [S, length] (default L): token k of sequence s at
  [s, k], else 0. x_RxL and the batch's loss_mask / seq_index are aligned (a scoring_view's
  [R, K] or the rows' [R, L]); `length` must hold the longest completion.

  The rank of a completion token within its sequence is its running count of completion tokens
  minus the count at the sequence's first completion token; this holds for packed rows too.
  """
  n = 2 * batch["valid"].shape[0]
  length = x_RxL.shape[1] if length is None else length
  mask = batch["loss_mask"].reshape(-1) > 0
  seq = batch["seq_index"].reshape(-1)
  count = jnp.cumsum(mask.astype(jnp.int32))
  first = jax.ops.segment_min(jnp.where(mask, count, jnp.iinfo(jnp.int32).max), seq,
                              num_segments=n)
  rank = jnp.where(mask, count - first[seq], length)   # non-completion tokens fall off the end
  out = jnp.zeros((n, length), x_RxL.dtype)
  return out.at[seq, rank].set(x_RxL.reshape(-1), mode="drop")
