"""One layer's causal self-attention alone, JAX (XLA:CPU) vs torch's fused SDPA, on the
side-by-side benchmark's shapes (4 heads of 64).

    python benchmarks/attention_alone.py [--rows 16 --seq 256] [--rows 8 --seq 384] [--threads 2]

The defaults are the side-by-side's one-row-per-sequence layout (16 rows of 256); `--rows 8
--seq 384` is its shared-prompt layout. Times the attention core only (q, k, v in, output out):
forward, and forward+backward of sum(out * g) with respect to q, k and v. Best of `--reps`
calls after two warm-ups, in `--rounds` alternating rounds (the best round counts). Variants:
- einsum: dpo_jax's default (layers.dot_product_attention with the layout mask);
- jax.nn xla: model.attention_impl=xla;
- chunks of C: model.attention_chunk=C for each C in `--chunks` (default 64,128): query chunks
  against the keys up to their end, so the blocks above the diagonal are skipped;
- torch SDPA causal: torch.nn.functional.scaled_dot_product_attention(is_causal=True), which
  TRL's Llama uses; torch is optional.
FLOPs are the causal-agnostic 4·rows·heads·L²·Dh forward (×3 with the backward).
"""
import argparse

from matmul_alone import best, use_threads   # this directory is on sys.path as a script


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rows", type=int, default=16)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--head-dim", type=int, default=64)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--chunks", default="64,128", help="model.attention_chunk values to time")
  args = ap.parse_args()
  torch = use_threads(args.threads)
  import jax   # noqa: PLC0415
  import jax.numpy as jnp   # noqa: PLC0415
  import numpy as np   # noqa: PLC0415

  from dpo_jax.models import layers   # noqa: PLC0415

  b, n, h, dh = args.rows, args.seq, args.heads, args.head_dim
  rng = np.random.default_rng(0)
  q, k, v, g = (rng.standard_normal((b, n, h, dh), np.float32) for _ in range(4))
  positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  segments = jnp.ones((b, n), jnp.int32)
  mask = layers.attention_mask(positions, segments, positions, segments, None)

  variants = {
      "einsum": lambda q, k, v: layers.dot_product_attention(q, k, v, mask),
      "jax.nn xla": lambda q, k, v: layers.library_attention(q, k, v, mask, "xla"),
  }
  for c in map(int, filter(None, args.chunks.split(","))):
    variants[f"chunks of {c}"] = (lambda q, k, v, c=c: layers.chunked_attention(
        q, k, v, positions, segments, None, c))
  jq, jk, jv, jg = map(jnp.asarray, (q, k, v, g))
  timed = {}
  reference = None
  for name, f in variants.items():
    fwd = jax.jit(f)
    grad = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * jg), argnums=(0, 1, 2)))
    out = np.asarray(fwd(jq, jk, jv))
    reference = out if reference is None else reference
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-5, err_msg=name)
    timed[name] = (lambda fwd=fwd: fwd(jq, jk, jv).block_until_ready(),
                   lambda grad=grad: jax.block_until_ready(grad(jq, jk, jv)))
  if torch is not None:
    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous().requires_grad_()
                  for x in (q, k, v))
    tg = torch.from_numpy(g).transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    out = sdpa(tq, tk, tv, is_causal=True).transpose(1, 2).detach().numpy()
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-5, err_msg="torch")

    def torch_fwd():
      with torch.no_grad():
        sdpa(tq, tk, tv, is_causal=True)

    def torch_grad():
      for x in (tq, tk, tv):
        x.grad = None
      (sdpa(tq, tk, tv, is_causal=True) * tg).sum().backward()
    timed["torch SDPA causal"] = (torch_fwd, torch_grad)
  else:
    print("torch not installed: no torch row (pip install torch==2.13.0)")

  results = {name: [float("inf"), float("inf")] for name in timed}
  for _ in range(args.rounds):
    for name, (fwd, grad) in timed.items():
      results[name][0] = min(results[name][0], best(fwd, args.reps))
      results[name][1] = min(results[name][1], best(grad, args.reps))
  flops = 4 * b * h * n * n * dh
  print(f"{b} rows x {n}, {h} heads of {dh}, {args.threads} threads (best of {args.reps} calls x "
        f"{args.rounds} rounds)")
  print(f"{'':20s}{'fwd ms':>9s}{'fwd+bwd ms':>12s}{'fwd+bwd GF/s':>14s}")
  for name, (tf, tg_) in results.items():
    print(f"{name:20s}{tf * 1e3:9.1f}{tg_ * 1e3:12.1f}{3 * flops / tg_ / 1e9:14.1f}")


if __name__ == "__main__":
  main()
