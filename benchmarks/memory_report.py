"""Peak bytes of the compiled training step for one fixed shape under each memory option.

    python benchmarks/memory_report.py [--vocab 32000 --seq 512 --batch 8] [--json out.json]

Each row is `python -m dpo_jax.bench`'s `peak_bytes` (XLA memory_analysis of the compiled step:
arguments + outputs - donated aliases + temporaries) for the same model and batch, changing one
option at a time from the baseline (f32, remat=full, log-prob chunks of 256 positions, reference
= the initial policy in f32, logits only at completion positions):

  naive logits     logprob_chunk = seq and score_parts = 0: the full [2B, L, V] f32 logits
  chunks of 64     a chunk's logits are [2B, 64, V] instead of [2B, 256, V]
  remat=dots/none  keep matmul outputs / everything for the backward pass
  bf16 compute     model.dtype = bfloat16 (f32 master weights and optimizer state)
  bf16 reference   reference.dtype = bfloat16 (the frozen copy stored in bf16)
  no reference     reference.mode = none with SimPO (no reference weights or forward)
  attention chunks model.attention_chunk = 128: query chunks against the keys up to their end
  shared prompt    share_prompt: one row per pair, the prompt computed once
  every position   data.score_parts = 0: logits at every position, not only the completions'

The step is timed too (1 step after compilation), but on CPU the timing is only indicative.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rows(args):
  base = {"model.hidden_size": args.hidden, "model.num_layers": args.layers,
          "model.num_heads": args.heads, "model.num_kv_heads": args.heads,
          "model.intermediate_size": 4 * args.hidden, "model.vocab_size": args.vocab,
          "model.max_position_embeddings": max(args.seq, 1024),
          "model.remat": "full", "logprob_chunk": 256, "batch": args.batch, "seq": args.seq,
          "steps": 1, "warmup": 0, "peak.size": 256, "peak.reps": 1}
  return [
      ("baseline: f32, remat=full, chunks of 256", base),
      ("naive logits (one chunk = full [2B,L,V])", {**base, "logprob_chunk": args.seq,
                                                    "data.score_parts": 0}),
      ("chunks of 64 positions", {**base, "logprob_chunk": 64}),
      ("remat=dots", {**base, "model.remat": "dots"}),
      ("remat=none", {**base, "model.remat": "none"}),
      ("bf16 compute (f32 master weights)", {**base, "model.dtype": "bfloat16"}),
      ("bf16 compute, chunks of 128", {**base, "model.dtype": "bfloat16",
                                       "logprob_chunk": 128}),
      ("bf16 reference weights", {**base, "reference.dtype": "bfloat16"}),
      ("bf16 compute + bf16 reference", {**base, "model.dtype": "bfloat16",
                                          "reference.dtype": "bfloat16"}),
      ("no reference (SimPO, reference.mode=none)", {**base, "loss.name": "simpo",
                                                     "reference.mode": "none"}),
      ("attention in query chunks of 128", {**base, "model.attention_chunk": 128}),
      ("remat=none + attention chunks of 128", {**base, "model.remat": "none",
                                                "model.attention_chunk": 128}),
      ("shared prompt (one row per pair)", {**base, "share_prompt": True}),
      ("logits at every position (score_parts=0)", {**base, "data.score_parts": 0}),
  ]


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--json", help="also write the rows here")
  return p


def main(argv=None):
  args = parser().parse_args(argv)

  import jax   # noqa: PLC0415
  from dpo_jax import bench, configlib   # noqa: PLC0415
  out = []
  for name, overrides in rows(args):
    c = bench.get_config()
    for k, v in overrides.items():
      configlib.set_key(c, k, v)
    r = bench.run_bench(c, devices=jax.devices()[:1], log=lambda _: None)
    out.append({"option": name, "peak_bytes": r["peak_bytes"], "memory": r["memory"],
                "step_s": r["step_s"], "overrides": overrides})
    print(f"{name:45s} {r['peak_bytes'] / 2**20:9.1f} MiB  "
          f"(temp {r['memory']['temp_size'] / 2**20:8.1f} MiB)", file=sys.stderr, flush=True)
  shape = (f"Llama d={args.hidden}, {args.layers} layers, {args.heads} heads, "
           f"F={4 * args.hidden}, V={args.vocab}; {args.batch} pairs x {args.seq} tokens")
  print(f"\n{shape}\n\n| option | peak bytes (MiB) | of which temporaries (MiB) |\n|---|---|---|")
  for r in out:
    print(f"| {r['option']} | {r['peak_bytes'] / 2**20:.1f} | "
          f"{r['memory']['temp_size'] / 2**20:.1f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"shape": shape, "rows": out}, f, indent=1)


if __name__ == "__main__":
  main()
