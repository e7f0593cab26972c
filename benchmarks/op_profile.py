"""Where the compiled training step spends its time on CPU: XLA op times from a profiler trace.

    python benchmarks/op_profile.py [--top 25] [dpo_jax.bench --config.* flags ...]

Builds the step exactly as `python -m dpo_jax.bench` does (same config and flags; default the
side-by-side shape; with --config.from_data=True on the data's first batch), runs it `--steps` times under jax.profiler with XLA:CPU's per-op trace
events (--xla_cpu_enable_xprof_traceme), and prints per-step op time grouped by fusion kind and
the top ops with their output shape and source op, and the share of the attention core (ops
under the model's `attention_core` name scope: mask, scores, softmax, weighted values, forward
and backward; not the q/k/v/o projections). Op times can add up to more than the step's wall
time: XLA's CPU runtime runs independent ops concurrently.
"""
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

SHAPE = ["--config.model.hidden_size=256", "--config.model.num_layers=4",
         "--config.model.num_heads=4", "--config.model.num_kv_heads=4",
         "--config.model.intermediate_size=1024", "--config.model.vocab_size=2048",
         "--config.model.tie_word_embeddings=False", "--config.model.remat=none",
         "--config.model.scan_layers=False", "--config.batch=8", "--config.seq=256",
         "--config.model.max_position_embeddings=1024", "--config.loss.beta=0.1",
         "--config.mesh.data=1"]


def main():
  argv = sys.argv[1:]
  top = 25
  if "--top" in argv:
    i = argv.index("--top")
    top = int(argv[i + 1])
    del argv[i:i + 2]
  os.environ["XLA_FLAGS"] = ("--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2 "
                             "--xla_cpu_enable_xprof_traceme=true " +
                             os.environ.get("XLA_FLAGS", ""))
  # ml_collections registers the --config.* overrides it finds in sys.argv when the bench's
  # config flag is defined, i.e. on import: set argv first.
  sys.argv = ["op_profile"] + SHAPE + argv
  import jax   # noqa: PLC0415
  from absl import flags   # noqa: PLC0415
  from dpo_jax import bench   # noqa: PLC0415
  flags.FLAGS(sys.argv)
  c = bench._CONFIG.value   # noqa: SLF001 (the bench's own config flag)
  if c.from_data:   # the data's batch 0, placed as dpo_jax.bench places it
    from dpo_jax import train   # noqa: PLC0415
    run, host, _ = bench.prepare_data(c)
    batch = train.to_device(host[0], run)
  else:             # the same Run and synthetic batch as dpo_jax.bench
    run, batch, _ = bench.prepare(c)
  step = run.jit_train_step().lower(run.state, run.frozen, batch).compile()
  state = run.state
  for _ in range(c.warmup):
    state, _ = step(state, run.frozen, batch)
    jax.block_until_ready(state)
  n = max(c.steps, 1)
  with tempfile.TemporaryDirectory() as trace_dir:
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(n):
        state, _ = step(state, run.frozen, batch)
        jax.block_until_ready(state)
    wall = (time.perf_counter() - t0) / n
    trace = json.load(gzip.open(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz",
                                          recursive=True)[0]))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  hlo = {}
  for line in step.as_text().split("\n"):
    m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) ", line)
    if m:
      src = re.search(r'op_name="([^"]+)"', line)
      hlo.setdefault(m.group(1), (m.group(2), src.group(1) if src else ""))
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in hlo:
      per_op[e["name"]] += e.get("dur", 0) / 1e3 / n   # ms per step
  kinds = collections.Counter()
  for name, ms in per_op.items():
    kinds[re.sub(r"\.\d+$", "", name)] += ms
  print(f"step wall {wall * 1e3:.1f} ms (under the profiler); op time {sum(per_op.values()):.1f} "
        f"ms per step")
  print("\nby kind (ms per step):")
  for kind, ms in kinds.most_common(12):
    print(f"  {ms:9.1f}  {kind}")
  from dpo_jax.models import layers   # noqa: PLC0415
  core = sum(ms for name, ms in per_op.items() if layers.ATTENTION_SCOPE in hlo[name][1])
  print(f"\nattention core ({layers.ATTENTION_SCOPE!r} scope): {core:.1f} ms per step, "
        f"{core / max(sum(per_op.values()), 1e-9):.1%} of op time")
  print(f"\ntop {top} ops (ms per step, output shape, source):")
  for name, ms in per_op.most_common(top):
    shape, src = hlo[name]
    print(f"  {ms:8.1f}  {name:26s} {shape:28s} {src[-70:]}")


if __name__ == "__main__":
  main()
