"""How often a multi-device CPU run of a batch-coupled loss with gradient accumulation aborts.

XLA:CPU runs independent parts of a program concurrently; when devices take a loop's
collectives and the collectives beside it in different orders, they wait for each other until
XLA aborts the process ("Termination timeout for all gather ..."). train.after_loop orders the
whole-batch path's loops; this script counts finished and aborted runs, each a fresh process
that dispatches --steps train steps without waiting between them, the program compiled by the
first and loaded from a compilation cache by the others (as in the tests):

    python benchmarks/cpu_collective_race.py --runs 6 --devices 4 --loss bco_pair

Compare with the commit before train.after_loop (4 of 6 runs aborted there, 0 of 6 after).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import sys
from dpo_jax import build, configlib, train
loss, k, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cfg = configlib.load("configs/dpo.py:runlocal,loss=" + loss,
                     {"grad_accum": k, "batch_size": batch, "data.max_length": 64,
                      "data.max_prompt_length": 40, "eval_every": 0})
run = build.setup(cfg)
step, state = run.jit_train_step(), run.state
for i in range(steps):
  state, m = step(state, run.frozen,
                  build.to_device(train.train_batch(run.train_data, i, k), run))
print("loss", float(m["loss"]))
"""


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--runs", type=int, default=6)
  p.add_argument("--devices", type=int, default=4)
  p.add_argument("--loss", default="bco_pair")
  p.add_argument("--grad-accum", type=int, default=2)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=12)
  p.add_argument("--timeout", type=int, default=300)
  a = p.parse_args(argv)
  cache = tempfile.mkdtemp(prefix="dpo_jax_race_cache_")
  # As the tests run: a persistent compilation cache (every run after the first loads the
  # program from it) and XLA's fastest compile.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={a.devices} "
                      "--xla_backend_optimization_level=0"}
  finished = aborted = 0
  for r in range(a.runs):
    t = time.perf_counter()
    try:
      out = subprocess.run([sys.executable, "-c", CHILD, a.loss, str(a.grad_accum),
                            str(a.batch), str(a.steps)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=a.timeout)
      ok = out.returncode == 0
      why = "" if ok else ("collective timeout" if "Termination timeout" in out.stderr
                           else out.stderr.strip().splitlines()[-1][:200])
    except subprocess.TimeoutExpired:
      ok, why = False, f"no end within {a.timeout} s"
    finished, aborted = finished + ok, aborted + (not ok)
    print(f"run {r + 1}: {'finished' if ok else 'ABORTED (' + why + ')'} in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
  shutil.rmtree(cache, ignore_errors=True)
  print(f"{a.loss}, grad_accum={a.grad_accum}, batch {a.batch}, {a.devices} CPU devices: "
        f"{finished} of {a.runs} finished, {aborted} aborted")
  return aborted


if __name__ == "__main__":
  sys.exit(1 if main() else 0)
