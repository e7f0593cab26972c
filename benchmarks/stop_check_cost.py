"""What the per-step preemption check costs the host when training runs as several processes.

Runs `configs/dpo.py:runlocal` (40 steps, logged every 10) as 2 processes × 4 CPU devices
(jax.distributed on localhost) and times every call of `PreemptionFlag.is_set`, the check the
loop makes after dispatching each step. Process 0 prints one JSON line: the median call in ms
(after 5 steps) and the trainer's own `perf/step_s`.

    python benchmarks/stop_check_cost.py
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(process: int, port: int, workdir: str):
  import jax   # noqa: PLC0415
  jax.distributed.initialize(f"localhost:{port}", 2, process)
  import numpy as np   # noqa: PLC0415
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import dpo   # noqa: PLC0415
  from dpo_jax import train   # noqa: PLC0415
  cfg = dpo.get_config("runlocal")
  cfg.steps, cfg.log_every, cfg.eval_every, cfg.ckpt_every, cfg.progress = 40, 10, 0, 100, False
  calls, is_set = [], train.PreemptionFlag.is_set

  def timed(self, step):
    t = time.perf_counter()
    out = is_set(self, step)
    calls.append(time.perf_counter() - t)
    return out

  train.PreemptionFlag.is_set = timed
  last = train.train_and_evaluate(cfg, workdir)
  if process == 0:
    print(json.dumps({"is_set_ms_median": round(1e3 * float(np.median(calls[5:])), 3),
                      "step_s": last.get("perf/step_s"), "processes": 2, "devices_each": 4}))


def main():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  with tempfile.TemporaryDirectory() as workdir:
    procs = [subprocess.Popen([sys.executable, __file__, str(p), str(port), workdir], env=env,
                              cwd=REPO) for p in (0, 1)]
    sys.exit(max(p.wait() for p in procs))


if __name__ == "__main__":
  if len(sys.argv) == 4:
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
  else:
    main()
