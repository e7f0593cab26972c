"""Tokenising shared among processes: wall time of preference.tokenize_rows on the same rows as
1 process and as 2 (jax.distributed on localhost, distributed.tokenize_split: each process
tokenises every 2nd row, then the parts are exchanged with a device all-gather).

The rows are conversational (the byte tokenizer's chat template), 2 user/assistant turns each.
Process 0 prints one JSON line per layout: rows, seconds, and the exchange's share of them.

    python benchmarks/shared_tokenising.py [rows]
"""
import json
import os
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows(n: int) -> list[dict]:
  words = "the answer is four because two and two make four not five".split()
  say = lambda i, k: " ".join(words[(i * 7 + j) % len(words)] for j in range(k))   # noqa: E731
  msg = lambda role, text: {"role": role, "content": text}   # noqa: E731
  return [{"prompt": [msg("user", say(i, 40)), msg("assistant", say(i + 1, 60)),
                      msg("user", say(i + 2, 30))],
           "chosen": [msg("assistant", say(i + 3, 80))],
           "rejected": [msg("assistant", say(i + 4, 70))]} for i in range(n)]


def worker(n: int, processes: int):
  import jax   # noqa: PLC0415
  from dpo_jax import distributed   # noqa: PLC0415
  from dpo_jax.data import preference   # noqa: PLC0415
  from dpo_jax.data.tokenizer import byte_tokenizer   # noqa: PLC0415
  distributed.maybe_initialize()
  data, tok = rows(n), byte_tokenizer()
  opts = preference.TokenizeOptions(1024, 512)
  split = distributed.tokenize_split()
  exchange = split.get("exchange")
  spent = [0.0]
  if exchange:
    def timed(blob):
      t = time.perf_counter()
      out = exchange(blob)
      spent[0] += time.perf_counter() - t
      return out
    split["exchange"] = timed
  t = time.perf_counter()
  examples, _ = preference.tokenize_rows(data, tok, opts, "bench", **split)
  wall = time.perf_counter() - t
  if jax.process_index() == 0:
    print(json.dumps({"processes": processes, "rows": len(examples), "seconds": round(wall, 2),
                      "exchange_seconds": round(spent[0], 2)}), flush=True)


def main():
  n = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  subprocess.run([sys.executable, __file__, "worker", str(n), "1"], env=env, cwd=REPO, check=True)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      [sys.executable, __file__, "worker", str(n), "2"], cwd=REPO,
      env={**env, "DPO_JAX_DISTRIBUTED": "1", "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
           "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}) for i in (0, 1)]
  sys.exit(max(p.wait() for p in procs))


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "worker":
    worker(int(sys.argv[2]), int(sys.argv[3]))
  else:
    main()
