"""Single matmuls alone, JAX (XLA:CPU) vs torch, on the projection shapes of the side-by-side
benchmark (8 pairs x 256 tokens = 4096 rows, d=256, F=1024, V=2048).

    python benchmarks/matmul_alone.py [--threads 2]

Prints GFLOP/s (2·m·k·n / best of 10 timed calls after 2 warm-ups) for each shape: forward
[tokens, in] @ [in, out], the data gradient, the weight gradients (contracting the 4096 rows,
which XLA:CPU leaves to Eigen; each also with x^T copied first, which makes it a YNNPACK dot), the
unembedding, and the [2048]³ matmul dpo_jax.bench takes as its peak. Then the same matmuls in
a graph: an 8-layer SwiGLU-free MLP chain x + silu(x @ A) @ B on [4096, 256] (A [256, 1024], B
[1024, 256]), forward alone and forward+backward, in both frameworks. torch is optional.
"""
import argparse
import os
import time


def best(fn, reps=10):
  fn()
  fn()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def use_threads(threads: int):
  """XLA:CPU and torch on `threads` threads; call before importing jax. Returns torch, or None
  when it is not installed."""
  os.environ["XLA_FLAGS"] = (f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads="
                             f"{threads} " + os.environ.get("XLA_FLAGS", ""))
  try:
    import torch   # noqa: PLC0415
  except ImportError:
    return None
  torch.set_num_threads(threads)
  return torch


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--threads", type=int, default=2)
  args = ap.parse_args()
  torch = use_threads(args.threads)
  import jax   # noqa: PLC0415
  import jax.numpy as jnp   # noqa: PLC0415
  import numpy as np   # noqa: PLC0415
  shapes = [("projection fwd", (4096, 256), (256, 1024), False),
            ("data gradient", (4096, 1024), (1024, 256), False),
            ("weight gradient (x^T g)", (4096, 256), (4096, 1024), True),
            ("  x^T copied first", (4096, 256), (4096, 1024), "copy"),
            ("weight gradient (x^T g)", (4096, 1024), (4096, 256), True),
            ("  x^T copied first", (4096, 1024), (4096, 256), "copy"),
            ("unembedding", (4096, 256), (256, 2048), False),
            ("bench peak", (2048, 2048), (2048, 2048), False)]
  rng = np.random.default_rng(0)
  print(f"{'':26s}{'shape':>28s}{'jax GF/s':>10s}{'torch GF/s':>12s}")
  for name, sa, sb, transposed in shapes:
    a = rng.standard_normal(sa, np.float32)
    b = rng.standard_normal(sb, np.float32)
    m, k, n = (sa[1], sa[0], sb[1]) if transposed else (sa[0], sa[1], sb[1])
    flops = 2 * m * k * n
    if transposed == "copy":   # a YNNPACK dot after an explicit transpose; the barrier keeps
      # XLA from folding the transpose back into the dot (then an Eigen dot, like x^T g)
      f = jax.jit(lambda x, y: jax.lax.optimization_barrier(x.T) @ y)
    else:
      f = jax.jit((lambda x, y: x.T @ y) if transposed else (lambda x, y: x @ y))
    xa, xb = jnp.asarray(a), jnp.asarray(b)
    tj = best(lambda: f(xa, xb).block_until_ready())
    tt = None
    if torch is not None and transposed != "copy":   # torch's x^T g is timed on the row above
      ta, tb = torch.from_numpy(a), torch.from_numpy(b)
      tt = best(lambda: (ta.t() @ tb) if transposed else (ta @ tb))
    shape = f"{sa}{'^T' if transposed else ''}@{sb}"
    print(f"{name:26s}{shape:>28s}{flops / tj / 1e9:10.1f}"
          f"{(flops / tt / 1e9) if tt else float('nan'):12.1f}")
  chain(rng, torch)


def chain(rng, torch, layers=8, rows=4096, d=256, f=1024):
  """The matmuls in a graph: MLP chain forward, and forward+backward (3x the FLOPs)."""
  import jax   # noqa: PLC0415
  import jax.numpy as jnp   # noqa: PLC0415
  import numpy as np   # noqa: PLC0415
  x = rng.standard_normal((rows, d), np.float32)
  ws = [(0.05 * rng.standard_normal((d, f), np.float32),
         0.05 * rng.standard_normal((f, d), np.float32)) for _ in range(layers)]
  fwd_flops = layers * 2 * (2 * rows * d * f)

  def mlp(x, ws):
    for a, b in ws:
      x = x + jax.nn.silu(x @ a) @ b
    return x
  jws, jx = jax.tree.map(jnp.asarray, ws), jnp.asarray(x)
  fwd = jax.jit(mlp)
  grad = jax.jit(jax.grad(lambda ws, x: jnp.sum(mlp(x, ws) ** 2)))
  rows_out = [("MLP chain forward", fwd_flops, best(lambda: fwd(jx, jws).block_until_ready()),
               None),
              ("MLP chain forward+backward", 3 * fwd_flops,
               best(lambda: jax.block_until_ready(grad(jws, jx)), reps=5), None)]
  if torch is not None:
    tws = [(torch.from_numpy(a).requires_grad_(), torch.from_numpy(b).requires_grad_())
           for a, b in ws]
    tx = torch.from_numpy(x)

    def tmlp():
      y = tx
      for a, b in tws:
        y = y + torch.nn.functional.silu(y @ a) @ b
      return y

    def tfwd():
      with torch.no_grad():
        tmlp()

    def tgrad():
      for a, b in tws:
        a.grad = b.grad = None
      (tmlp() ** 2).sum().backward()
    rows_out[0] = rows_out[0][:3] + (best(tfwd, reps=5),)
    rows_out[1] = rows_out[1][:3] + (best(tgrad, reps=5),)
  print(f"\n{'in a graph':26s}{f'{layers} layers, {rows}x{d}, F={f}':>28s}{'jax GF/s':>10s}"
        f"{'torch GF/s':>12s}")
  for name, flops, tj, tt in rows_out:
    print(f"{name:26s}{'':>28s}{flops / tj / 1e9:10.1f}"
          f"{(flops / tt / 1e9) if tt else float('nan'):12.1f}")


if __name__ == "__main__":
  main()
