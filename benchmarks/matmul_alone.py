"""Single matmuls alone, JAX (XLA:CPU) vs torch, on the projection shapes of the side-by-side
benchmark (8 pairs x 256 tokens = 4096 rows, d=256, F=1024, V=2048).

    python benchmarks/matmul_alone.py [--threads 2]

Prints GFLOP/s (2·m·k·n / best of 10 timed calls after 2 warm-ups) for each shape: forward
[tokens, in] @ [in, out], the data gradient, the weight gradient (contracting the 4096 rows), the
unembedding, and the [2048]³ matmul dpo_jax.bench takes as its peak. torch is optional.
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


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--threads", type=int, default=2)
  args = ap.parse_args()
  os.environ["XLA_FLAGS"] = (f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads="
                             f"{args.threads} " + os.environ.get("XLA_FLAGS", ""))
  import jax   # noqa: PLC0415
  import jax.numpy as jnp   # noqa: PLC0415
  import numpy as np   # noqa: PLC0415
  try:
    import torch   # noqa: PLC0415
    torch.set_num_threads(args.threads)
  except ImportError:
    torch = None
  shapes = [("projection fwd", (4096, 256), (256, 1024), False),
            ("data gradient", (4096, 1024), (1024, 256), False),
            ("weight gradient (x^T g)", (4096, 256), (4096, 1024), True),
            ("unembedding", (4096, 256), (256, 2048), False),
            ("bench peak", (2048, 2048), (2048, 2048), False)]
  rng = np.random.default_rng(0)
  print(f"{'':26s}{'shape':>28s}{'jax GF/s':>10s}{'torch GF/s':>12s}")
  for name, sa, sb, transposed in shapes:
    a = rng.standard_normal(sa, np.float32)
    b = rng.standard_normal(sb, np.float32)
    m, k, n = (sa[1], sa[0], sb[1]) if transposed else (sa[0], sa[1], sb[1])
    flops = 2 * m * k * n
    f = jax.jit((lambda x, y: x.T @ y) if transposed else (lambda x, y: x @ y))
    xa, xb = jnp.asarray(a), jnp.asarray(b)
    tj = best(lambda: f(xa, xb).block_until_ready())
    tt = None
    if torch is not None:
      ta, tb = torch.from_numpy(a), torch.from_numpy(b)
      tt = best(lambda: (ta.t() @ tb) if transposed else (ta @ tb))
    shape = f"{sa}{'^T' if transposed else ''}@{sb}"
    print(f"{name:26s}{shape:>28s}{flops / tj / 1e9:10.1f}"
          f"{(flops / tt / 1e9) if tt else float('nan'):12.1f}")


if __name__ == "__main__":
  main()
