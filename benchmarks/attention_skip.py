"""Would skipping the attention blocks outside each row's segments pay on XLA:CPU? One layer's
attention core on a dataset's batches.

    python benchmarks/attention_skip.py --config.data.train=F --config.model.tokenizer=T \
        [--batches 3] [--chunk 64] [dpo_jax.bench --config.* flags ...]

Builds the trainer's batches of config.data.train as `dpo_jax.bench --config.from_data=True`
does (bucketed, packed or prompt-shared rows, as --config.data.* say; default model the
side-by-side shape of op_profile.py). For each of the first --batches:
- counts the chunk × chunk blocks of attention scores:
  - causal: what dpo_jax's query chunks compute (model.attention_chunk: chunk i against key
    blocks 0..i, every row alike);
  - per row: the blocks from the first key some query of the chunk sees to the chunk's end,
    row by row (a kernel that skips blocks per row);
  - per batch: the widest such span over the rows, for every row (all that one program for
    all rows can skip);
- times one layer's attention core (random q, k, v; the batch's positions and segment ids),
  forward and forward+backward, best of --reps:
  - chunked: layers.chunked_attention, rows batched (dpo_jax's);
  - per row, full span: the same per row in a lax.scan over rows;
  - per row, skipping: per row, lax.switch picks the chunk's span of key blocks.
  Outputs and gradients at real tokens are checked against `chunked` before timing.
"""
import functools
import os
import sys

from matmul_alone import best   # this directory is on sys.path as a script
from op_profile import SHAPE


def block_spans(positions, segment_ids, window, chunk):
  """[B, n] key blocks each row's query chunk needs: from the block of the first key any of its
  queries sees up to the chunk's own block (0 when none sees any)."""
  import jax.numpy as jnp   # noqa: PLC0415

  from dpo_jax.models import layers   # noqa: PLC0415
  b, length = positions.shape
  n = -(-length // chunk)
  mask = layers.attention_mask(positions, segment_ids, positions, segment_ids, window)
  pad = n * chunk - length
  mask = jnp.pad(mask, ((0, 0), (0, pad), (0, pad)))
  seen = mask.reshape(b, n, chunk, n, chunk).any(axis=(2, 4))      # [B, query chunk, key block]
  first = jnp.argmax(seen, axis=2)
  return jnp.where(seen.any(2), jnp.arange(n)[None] + 1 - first, 0).astype(jnp.int32)


def per_row_attention(q, k, v, positions, segment_ids, window, chunk, skip: bool):
  """Attention row by row (lax.scan), query chunk i against key blocks [i + 1 - m, i]: m = i + 1
  (full span), or m = the span block_spans finds, chosen by lax.switch (skip)."""
  import jax   # noqa: PLC0415
  import jax.numpy as jnp   # noqa: PLC0415

  from dpo_jax.models import layers   # noqa: PLC0415
  b, length = q.shape[:2]
  n = -(-length // chunk)
  # The full span needs no counts: it gets zeros, not block_spans' [B, L, L] mask.
  spans = (block_spans(positions, segment_ids, window, chunk) if skip
           else jnp.zeros((b, n), jnp.int32))

  def span(m, i, q_c, k_r, v_r, pos_r, seg_r):
    s, e = i * chunk, min((i + 1) * chunk, length)
    if m == 0:
      return jnp.zeros_like(q_c)
    ks = (i + 1 - m) * chunk
    mask = layers.attention_mask(pos_r[None, s:e], seg_r[None, s:e], pos_r[None, ks:e],
                                 seg_r[None, ks:e], window)
    return layers.dot_product_attention(q_c[None], k_r[None, ks:e], v_r[None, ks:e], mask)[0]

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def row(q_r, k_r, v_r, pos_r, seg_r, spans_r):
    outs = []
    for i in range(n):
      args = (q_r[i * chunk:(i + 1) * chunk], k_r, v_r, pos_r, seg_r)
      if skip:
        outs.append(jax.lax.switch(spans_r[i], [functools.partial(span, m, i)
                                                for m in range(i + 2)], *args))
      else:
        outs.append(span(i + 1, i, *args))
    return jnp.concatenate(outs, 0)

  _, out = jax.lax.scan(lambda c, xs: (c, row(*xs)), None,
                        (q, k, v, positions, segment_ids, spans))
  return out


def main():
  argv = sys.argv[1:]
  opts = {"--batches": 3, "--chunk": 64, "--reps": 5}
  for name in opts:
    if name in argv:
      i = argv.index(name)
      opts[name] = int(argv[i + 1])
      del argv[i:i + 2]
  os.environ["XLA_FLAGS"] = ("--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2 "
                             + os.environ.get("XLA_FLAGS", ""))
  sys.argv = ["attention_skip"] + SHAPE + ["--config.from_data=True", "--config.warmup=0",
                                           f"--config.steps={opts['--batches']}"] + argv
  import jax   # noqa: PLC0415
  import jax.numpy as jnp   # noqa: PLC0415
  import numpy as np   # noqa: PLC0415
  from absl import flags   # noqa: PLC0415

  from dpo_jax import bench   # noqa: PLC0415
  from dpo_jax.models import layers   # noqa: PLC0415
  flags.FLAGS(sys.argv)
  c = bench._CONFIG.value   # noqa: SLF001 (the bench's own config flag)
  _, batches, _ = bench.prepare_data(c)
  chunk, window = opts["--chunk"], c.model.get("sliding_window")
  h, kh = c.model.num_heads, c.model.num_kv_heads
  dh = c.model.hidden_size // h

  blocks = {"causal": 0, "per row": 0, "per batch": 0}
  timed = {}
  for n_batch, host in enumerate(batches):
    pos, seg = (jnp.asarray(host[key].reshape(-1, host[key].shape[-1]))
                for key in ("positions", "segment_ids"))
    b, length = pos.shape
    n = -(-length // chunk)
    spans = np.asarray(block_spans(pos, seg, window, chunk))
    blocks["causal"] += b * n * (n + 1) // 2
    blocks["per row"] += int(spans.sum())
    blocks["per batch"] += b * int(spans.max(0).sum())
    rng = np.random.default_rng(n_batch)
    q, g = (jnp.asarray(rng.standard_normal((b, length, h, dh), np.float32)) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, length, kh, dh), np.float32)) for _ in range(2))
    real = (seg > 0)[:, :, None, None]
    variants = {
        "chunked (dpo_jax)": lambda q, k, v: layers.chunked_attention(q, k, v, pos, seg, window,
                                                                      chunk),
        "per row, full span": lambda q, k, v: per_row_attention(q, k, v, pos, seg, window,
                                                                chunk, skip=False),
        "per row, skipping": lambda q, k, v: per_row_attention(q, k, v, pos, seg, window,
                                                               chunk, skip=True)}
    reference = None
    for name, f in variants.items():
      fwd = jax.jit(lambda q, k, v, f=f: jnp.where(real, f(q, k, v), 0))
      grad = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(jnp.where(real, f(q, k, v), 0) * g),
                              argnums=(0, 1, 2)))
      got = [np.asarray(fwd(q, k, v))] + [np.asarray(x) for x in grad(q, k, v)]
      reference = got if reference is None else reference
      for x, y, what in zip(got, reference, ("output", "dq", "dk", "dv")):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-4, err_msg=f"{name}: {what}")
      t = timed.setdefault(name, [0.0, 0.0])
      t[0] += best(lambda fwd=fwd: fwd(q, k, v).block_until_ready(), opts["--reps"])
      t[1] += best(lambda grad=grad: jax.block_until_ready(grad(q, k, v)), opts["--reps"])
  print(f"{len(batches)} batches of {c.data.train} (rows of {length}): {chunk} × {chunk} blocks "
        f"of scores")
  for name, count in blocks.items():
    print(f"  {name:12s}{count:8d}  {count / blocks['causal']:.3f} of causal")
  print(f"one layer's attention core, {h} heads of {dh}, summed over the batches "
        f"(best of {opts['--reps']}):")
  print(f"  {'':22s}{'fwd ms':>9s}{'fwd+bwd ms':>12s}")
  for name, (tf, tg) in timed.items():
    print(f"  {name:22s}{tf * 1e3:9.1f}{tg * 1e3:12.1f}")


if __name__ == "__main__":
  main()
