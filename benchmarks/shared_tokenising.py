"""Tokenising shared among processes: wall time of preference.tokenize_rows on the same rows as
1 process and as 2 (jax.distributed on localhost, distributed.tokenize_split: each process
tokenises every 2nd row, then the parts are exchanged with a device all-gather).

The rows are conversational (the byte tokenizer's chat template), 2 user/assistant turns each.
Process 0 prints one JSON line per layout: rows, seconds, and how many of them process 0
spent packing its part, in the exchange, and unpacking the other parts.

    python benchmarks/shared_tokenising.py [rows]
"""
import json
import sys
import time

import _launch


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
  spent = {"exchange": 0.0, "pack": 0.0, "unpack": 0.0}

  def timed(name, fn):
    def run(*args):
      t = time.perf_counter()
      out = fn(*args)
      spent[name] += time.perf_counter() - t
      return out
    return run

  if exchange:
    split["exchange"] = timed("exchange", exchange)
  preference.pack_part = timed("pack", preference.pack_part)
  preference.unpack_part = timed("unpack", preference.unpack_part)
  t = time.perf_counter()
  examples, _ = preference.tokenize_rows(data, tok, opts, "bench", **split)
  wall = time.perf_counter() - t
  if jax.process_index() == 0:
    print(json.dumps({"processes": processes, "rows": len(examples), "seconds": round(wall, 2),
                      **{f"{k}_seconds": round(v, 2) for k, v in spent.items()}}), flush=True)


def main():
  n = sys.argv[1] if len(sys.argv) > 1 else "4000"
  for processes in (1, 2):
    status = _launch.processes([__file__, "worker", n, str(processes)], processes, 1)
    if status:
      sys.exit(status)


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "worker":
    worker(int(sys.argv[2]), int(sys.argv[3]))
  else:
    main()
