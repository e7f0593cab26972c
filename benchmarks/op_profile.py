"""Where the compiled training step spends its time on CPU: XLA op times from a profiler trace.

    python benchmarks/op_profile.py [--top 25] [dpo_jax.bench --config.* flags ...]

Builds the step exactly as `python -m dpo_jax.bench` does (same config and flags; default the
side-by-side shape; with --config.from_data=True on the data's first batch), runs it `--steps` times under jax.profiler with XLA:CPU's per-op trace
events (--xla_cpu_enable_xprof_traceme), and prints per-step op time grouped by fusion kind and
the top ops with their output shape and source op, and the share of the attention core (ops
under the model's `attention_core` name scope: mask, scores, softmax, weighted values, forward
and backward; not the q/k/v/o projections). Op times can add up to more than the step's wall
time: XLA's CPU runtime runs independent ops concurrently.

Plain `dot` ops (the dots XLA:CPU leaves to Eigen rather than a YNNPACK fusion, e.g. the weight
gradients, which contract the token dimension of both operands) run asynchronously on the
intra-op thread pool: their trace event covers only the launch, a tenth or less of the dot. So
they are listed apart, each also timed alone (the same dot_general on operands of its shapes,
best of 5, times the calls per step), and the op time and the attention core's share are
printed both as traced and with the plain dots counted at their time alone.
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

from matmul_alone import best

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
    from dpo_jax import build   # noqa: PLC0415
    run, host, _ = bench.prepare_data(c)
    batch = build.to_device(host[0], run)
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
  text = step.as_text()
  hlo = {}
  for line in text.split("\n"):
    m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) ", line)
    if m:
      src = re.search(r'op_name="([^"]+)"', line)
      hlo.setdefault(m.group(1), (m.group(2), src.group(1) if src else ""))
  per_op, calls = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in hlo:
      per_op[e["name"]] += e.get("dur", 0) / 1e3 / n   # ms per step
      calls[e["name"]] += 1 / n   # more than once per step inside a loop
  dots = {d["name"]: d for d in plain_dots(text) if d["name"] in per_op}   # the ones that ran
  alone = {name: time_alone(d) * 1e3 * calls[name] for name, d in dots.items()}   # ms per step
  kinds = collections.Counter()
  for name, ms in per_op.items():
    kinds[re.sub(r"\.\d+$", "", name)] += ms
  op_time, dot_traced = sum(per_op.values()), sum(per_op[name] for name in dots)
  with_dots = op_time - dot_traced + sum(alone.values())
  print(f"step wall {wall * 1e3:.1f} ms (under the profiler); op time {op_time:.1f} ms per step "
        f"as traced, {with_dots:.1f} ms with the plain dots at their time alone")
  print("\nby kind (ms per step, as traced):")
  for kind, ms in kinds.most_common(12):
    print(f"  {ms:9.1f}  {kind}")
  print(f"\nplain dot ops (Eigen, asynchronous: traced as their launch): {len(dots)}, traced "
        f"{dot_traced:.1f} ms, timed alone {sum(alone.values()):.1f} ms per step")
  by_shape = collections.defaultdict(list)
  for name, d in dots.items():
    by_shape[d["signature"]].append(name)
  for sig, names in sorted(by_shape.items(), key=lambda kv: -sum(alone[n] for n in kv[1])):
    times = sum(calls[name] for name in names)
    print(f"  {times:5.1f} x {alone[names[0]] / calls[names[0]]:7.2f} ms alone  {sig}  "
          f"{hlo[names[0]][1][-50:]}")
  from dpo_jax.models import layers   # noqa: PLC0415
  in_core = lambda name: layers.ATTENTION_SCOPE in hlo[name][1]
  core = sum(ms for name, ms in per_op.items() if in_core(name))
  core_with_dots = core + sum(alone[name] - per_op[name] for name in dots if in_core(name))
  print(f"\nattention core ({layers.ATTENTION_SCOPE!r} scope): {core:.1f} ms per step, "
        f"{core / max(op_time, 1e-9):.1%} of op time as traced; {core_with_dots:.1f} ms, "
        f"{core_with_dots / max(with_dots, 1e-9):.1%} with the plain dots at their time alone")
  print(f"\ntop {top} ops (ms per step, output shape, source):")
  for name, ms in per_op.most_common(top):
    shape, src = hlo[name]
    print(f"  {ms:8.1f}  {name:26s} {shape:28s} {src[-70:]}")


DOT = re.compile(r"\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\S* dot\(%(\S+), %(\S+)\),(.*)")


def plain_dots(text: str) -> list[dict]:
  """The `dot` instructions of an HLO module's text that are not inside a fusion, each with its
  operands' dtype and dimensions and its dimension numbers. Layouts are not kept: timed alone,
  the operands are row-major."""
  shapes, fused, out = {}, set(), []
  computation = None
  for line in text.split("\n"):
    head = re.match(r"(?:ENTRY )?%(\S+) ", line)
    if head and line.rstrip().endswith("{"):
      computation = head.group(1)
    m = re.match(r"\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]", line)
    if m:
      shapes[m.group(1)] = (m.group(2), tuple(int(x) for x in m.group(3).split(",") if x))
    fused.update(re.findall(r"kind=k\w+, calls=%([\w.-]+)", line))
    m = DOT.match(line)
    if m:
      dims = {k: tuple(int(x) for x in v.split(",") if x)
              for k, v in re.findall(r"(\w+_dims)=\{([\d,]*)\}", m.group(6))}
      out.append({"name": m.group(1), "computation": computation, "lhs": m.group(4),
                  "rhs": m.group(5), "dims": dims})
  dots = []
  for d in out:
    if d["computation"] in fused:
      continue
    (dtype, lhs), (_, rhs) = shapes[d["lhs"]], shapes[d["rhs"]]
    dims = d["dims"]
    d.update(dtype=dtype, lhs_shape=lhs, rhs_shape=rhs, signature=(
        f"{dtype}{list(lhs)}·{list(rhs)} contracting {dims.get('lhs_contracting_dims', ())}"
        f"/{dims.get('rhs_contracting_dims', ())} batch {dims.get('lhs_batch_dims', ())}"
        f"/{dims.get('rhs_batch_dims', ())}"))
    dots.append(d)
  return dots


def dot_fn(dot: dict):
  """The jitted (lhs, rhs) -> dot_general of a dot from plain_dots."""
  import jax   # noqa: PLC0415
  dims = dot["dims"]
  numbers = ((dims.get("lhs_contracting_dims", ()), dims.get("rhs_contracting_dims", ())),
             (dims.get("lhs_batch_dims", ()), dims.get("rhs_batch_dims", ())))
  return jax.jit(lambda x, y: jax.lax.dot_general(x, y, numbers))


_ALONE = {}


def time_alone(dot: dict, reps: int = 5) -> float:
  """Seconds for the dot_general of `dot` (from plain_dots) alone on random operands of its
  shapes, best of `reps`; once per distinct signature."""
  import jax.numpy as jnp   # noqa: PLC0415
  import numpy as np   # noqa: PLC0415
  if dot["signature"] not in _ALONE:
    dtype = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}[dot["dtype"]]
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal(s), dtype)
            for s in (dot["lhs_shape"], dot["rhs_shape"]))
    f = dot_fn(dot)
    _ALONE[dot["signature"]] = best(lambda: f(a, b).block_until_ready(), reps)
  return _ALONE[dot["signature"]]


if __name__ == "__main__":
  main()
