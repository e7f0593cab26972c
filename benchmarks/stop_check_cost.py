"""What the per-step preemption check costs the host when training runs as several processes.

Runs `configs/dpo.py:runlocal` (40 steps, logged every 10) as 2 processes × 4 CPU devices
(jax.distributed on localhost) and times every call of `PreemptionFlag.is_set`, the check the
loop makes after dispatching each step. Process 0 prints one JSON line: the median call in ms
(after 5 steps) and the trainer's own `perf/step_s`.

    python benchmarks/stop_check_cost.py
"""
import json
import os
import sys
import tempfile
import time

import _launch

REPO = _launch.REPO


def worker(workdir: str):
  import jax   # noqa: PLC0415
  import numpy as np   # noqa: PLC0415
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import dpo   # noqa: PLC0415
  from dpo_jax import distributed, train   # noqa: PLC0415
  distributed.maybe_initialize()
  cfg = dpo.get_config("runlocal")
  cfg.steps, cfg.log_every, cfg.eval_every, cfg.ckpt_every, cfg.progress = 40, 10, 0, 100, False
  calls, is_set = [], distributed.PreemptionFlag.is_set

  def timed(self, step):
    t = time.perf_counter()
    out = is_set(self, step)
    calls.append(time.perf_counter() - t)
    return out

  distributed.PreemptionFlag.is_set = timed
  last = train.train_and_evaluate(cfg, workdir)
  if jax.process_index() == 0:
    print(json.dumps({"is_set_ms_median": round(1e3 * float(np.median(calls[5:])), 3),
                      "step_s": last.get("perf/step_s"), "processes": 2, "devices_each": 4}))


def main():
  with tempfile.TemporaryDirectory() as workdir:
    sys.exit(_launch.processes([__file__, workdir], 2, 4))


if __name__ == "__main__":
  if len(sys.argv) == 2:
    worker(sys.argv[1])
  else:
    main()
