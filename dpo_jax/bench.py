"""Benchmark of the training step: throughput, MFU against a measured matmul peak, memory.

    python -m dpo_jax.bench --json [--config.batch=8 --config.seq=256 --config.model.hidden_size=256 ...]

The step is the trainer's own (build.setup -> Run.jit_train_step, the same optimizer, reference
and shardings), run on a synthetic batch of exactly `batch` pairs × `seq` tokens: 2·batch rows
[chosen; rejected] of random token ids, no padding, the first round(seq·prompt_fraction)
positions of each row are prompt (loss_mask 0), the rest completion. The batch is placed on the
devices once; the timed interval is one call of the compiled step until its outputs are ready
(jax.block_until_ready), after `warmup` untimed calls; step_s is the median of `steps` such
intervals. Compilation is timed separately (compile_s) and never counted.

FLOPs (model FLOPs, not hardware FLOPs: rematerialisation and the log-prob chunks' recomputed
logits are not counted):
  N        = matmul params: per layer q,k,v,o projections + gate/up/down, plus the unembedding
             (lm_head, or the tied embedding matrix) D·V; no norms, biases or embedding lookup
  A        = layers · seq · heads · head_dim (attention: QKᵀ and PV are 2·A FLOPs each per token
             forward, every key counted, causal masking not halved)
  per token = 6N + 12A (policy forward + backward) + [2N + 4A] (reference forward, only when a
             reference forward runs: reference.mode initial | checkpoint | sync and the loss
             reads it; none / precomputed have no reference forward)
  per step = per token · 2 · batch · seq, except that the unembedding's share of N (D·V; 6·D·V
             + [2·D·V] per position) is counted at the `scored_per_row` positions of each row
             where the step computes it: the completion tokens, rounded up to a multiple of
             row/4 (data.score_parts; models/logprobs.scoring_view), not prompt positions
With share_prompt (data.share_prompt: each pair is one row [prompt | chosen | rejected], the
prompt computed once) the step computes `batch` rows of row = seq + completion tokens, so row
replaces seq in A and per step = per token · batch · row: the FLOPs of the tokens computed, not
of the 2·batch·seq tokens of the unshared layout. pairs_per_s and tokens_per_s
(2·batch·seq / step_s) count the pairs' sequences either way.
MFU = flops_per_step / step_s / peak_flops, where peak_flops is measured here: the best of
`peak.reps` timed calls of one jitted [size, size] @ [size, size] matmul per device (a batched
matmul sharded over all devices of the mesh, so n devices do n matmuls at once), warmed up. The
matmul is in `peak.dtype`: "compute" (default) is the model's compute dtype (model.dtype), so an
f32 step is measured against an f32 matmul and a bf16 step against a bf16 one (on a GPU the
two peaks differ 2x or more: bf16 against an f32/TF32 peak would overstate MFU); or a dtype
name.

peak_bytes = argument + output − aliased (donated) + temporary bytes of the compiled step, from
XLA's memory_analysis(); device_peak_bytes is the device allocator's peak where the backend
reports one (GPU/TPU; not CPU).

from_data=True benchmarks the trainer on config.data.train instead (`--config.data.train=F
--config.model.tokenizer=T`, with config.data.* as in training: buckets, packing,
share_prompt): step i runs on the trainer's own batch i (train.train_batch), built and placed
on the devices inside its timed interval, as the training loop does. Batches differ in shape,
so every distinct shape is compiled before anything is timed (programs_compiled), step_s is
the mean over the timed steps (pairs_per_s = batch / step_s: an epoch's throughput, not a
typical step's), and flops_per_step, tokens_per_step (the sequences' real tokens, a shared
prompt counted in both), tokens_computed_per_step (row slots, padding included), rows and
row_length are means over the timed batches; data.pad_fraction is their padding. warmup
steps run first on batches 0..warmup-1: warmup = one epoch of steps times exactly the next
epoch. seq, prompt_fraction and share_prompt (the synthetic batch's layout) are not used.

With --json exactly one JSON line goes to stdout; everything else goes to stderr.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time

from absl import app, flags
import ml_collections
from ml_collections import config_flags

from dpo_jax import configlib, hostmem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_KEYS = ("batch", "seq", "prompt_fraction", "share_prompt", "from_data", "warmup",
              "peak")


def get_config() -> ml_collections.ConfigDict:
  """configs/dpo.py (the default DPO job) with the bench's shape keys; `batch` replaces
  batch_size and `steps` counts timed steps."""
  from dpo_jax import configlib   # noqa: PLC0415
  path = os.path.join(REPO, "configs", "dpo.py")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: dpo_jax.bench builds on the repository's configs/dpo.py")
  c = configlib.load(path)
  c.unlock()
  del c["batch_size"]
  c.batch = 8                 # preference pairs per step (2·batch sequences)
  c.seq = 256                 # tokens per sequence (prompt + completion), no padding
  c.prompt_fraction = 0.5     # leading share of each sequence that is prompt
  c.share_prompt = False      # one row per pair [prompt | chosen | rejected] (data.share_prompt)
  c.from_data = False         # True: time the trainer's own batches of config.data.train
                              # (tokenised, bucketed or packed as config.data.* says) instead
                              # of one synthetic batch; batch = pairs per step, seq unused
  c.steps = 10                # timed steps
  c.warmup = 3                # untimed steps after compilation
  c.progress = False
  c.peak = ml_collections.ConfigDict()
  c.peak.size = 0             # the peak matmul is [size, size] @ [size, size] per device; 0:
                              # 2048 on CPU, 8192 on GPU/TPU (a 2048³ call there takes tens of
                              # µs, near its dispatch time: the peak would read low)
  c.peak.dtype = "compute"    # its dtype: "compute" = model.dtype, or one of PEAK_DTYPES
  c.peak.reps = 10            # best of this many timed calls
  c.lock()
  return c


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------

FLOPS_DEFINITION = (
    "flops_per_token = 6*N + 12*A (policy fwd+bwd) + ref*(2*N + 4*A) (reference fwd; ref=1 "
    "iff a reference forward runs), at every position of a row; N = matmul params = "
    "layers*(D*Dh*(2*H + 2*K) + 3*D*F) + D*V (q,k,v,o, gate/up/down, unembedding; no norms, "
    "biases, embedding lookup); A = layers*seq*H*Dh (QK^T and PV, every key counted, causal "
    "not halved); remat recompute not counted, nor the extra policy forward of a batch-coupled "
    "loss with grad_accum > 1; flops_per_step = rows * (seq*(flops_per_token "
    "- (6 + 2*ref)*D*V) + scored_per_row*(6 + 2*ref)*D*V): the unembedding runs only at the "
    "scored positions of a row (its completion tokens, data.score_parts), not all seq; rows "
    "= 2*batch ([chosen; rejected]), or the packed or shared-prompt rows of the batch, each "
    "of seq tokens")


def unembed_params(cfg) -> int:
  return cfg.hidden_size * cfg.vocab_size


def matmul_params(cfg) -> int:
  """N: weights that take part in a matmul per token (see FLOPS_DEFINITION)."""
  d, f, v, dh = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.dim_per_head
  per_layer = d * dh * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * f
  return cfg.num_layers * per_layer + d * v


def teacher_shape(params) -> tuple[int, int, int]:
  """(N, layers·heads·head_dim, D·V) of a teacher from its param tree: every `kernel` leaf (q,
  k, v, o, MLP, lm_head) is a matmul weight; a tied unembedding is the embedding matrix."""
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): x
          for path, x in jax_tree_leaves_with_path(params)}
  n = sum(x.size for name, x in flat.items() if name.endswith("kernel"))
  if any("lm_head" in name for name in flat):
    u = sum(x.size for name, x in flat.items() if "lm_head" in name and name.endswith("kernel"))
  else:
    u = sum(x.size for name, x in flat.items() if "embed_tokens" in name)
    n += u
  q = next(x for name, x in flat.items() if "q_proj" in name and name.endswith("kernel"))
  layers, _, heads, head_dim = q.shape   # [layers, D, H, Dh]
  return n, layers * heads * head_dim, u


def jax_tree_leaves_with_path(tree):
  import jax   # noqa: PLC0415
  return jax.tree_util.tree_flatten_with_path(tree)[0]


def flops(cfg, batch: int, seq: int, reference_forward: bool, teacher_params=None, *,
          rows: int | None = None, scored: int | None = None) -> dict:
  """FLOPs of one step on `rows` rows of `seq` tokens (default 2·batch: [chosen; rejected]),
  the unembedding computed at `scored` positions per row (default seq)."""
  rows = 2 * batch if rows is None else rows
  scored = seq if scored is None else scored
  n, u = matmul_params(cfg), unembed_params(cfg)
  a = cfg.num_layers * seq * cfg.num_heads * cfg.dim_per_head
  ref = 1 if reference_forward else 0
  per_token = 6 * n + 12 * a + ref * (2 * n + 4 * a)
  per_step = (per_token - (6 + 2 * ref) * u) * seq + (6 + 2 * ref) * u * scored
  out = {"n_params_matmul": n, "attention_a": a, "flops_definition": FLOPS_DEFINITION}
  if teacher_params is not None:   # daDPO's teacher forward in the step
    n_te, a_te, u_te = teacher_shape(teacher_params)
    per_token += 2 * n_te + 4 * a_te * seq
    per_step += (2 * (n_te - u_te) + 4 * a_te * seq) * seq + 2 * u_te * scored
    out["n_params_matmul_teacher"] = n_te
    out["flops_definition"] += ("; + teacher fwd 2*N_te + 4*A_te (teacher.mode=step, from "
                                "its param tree)")
  # flops_per_token: every position of a row; flops_per_step: what the step computes
  out.update(flops_per_token=per_token, flops_per_step=per_step * rows, scored_per_row=scored)
  return out


# ---------------------------------------------------------------------------------------------
# Peak
# ---------------------------------------------------------------------------------------------


PEAK_DTYPES = ("float32", "bfloat16", "float16")


def peak_dtype(c) -> str:
  """The peak matmul's dtype: config.peak.dtype, "compute" meaning config.model.dtype."""
  name = c.model.dtype if c.peak.dtype == "compute" else c.peak.dtype
  if name not in PEAK_DTYPES:
    raise ValueError(f"config.peak.dtype={c.peak.dtype!r}"
                     f"{f' (model.dtype={name!r})' if c.peak.dtype == 'compute' else ''} must "
                     f"be 'compute' or one of {PEAK_DTYPES}")
  return name


def peak_matmul(devices, size: int, dtype: str = "float32"):
  """(jitted matmul, operands a, b): one [size]³ matmul in `dtype` per device, all at once."""
  import jax   # noqa: PLC0415
  import jax.numpy as jnp   # noqa: PLC0415
  import numpy as np   # noqa: PLC0415
  from jax.sharding import NamedSharding, PartitionSpec as P   # noqa: PLC0415
  n = len(devices)
  mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
  sh = NamedSharding(mesh, P("d"))
  make = jax.jit(lambda k: (jax.random.normal(k, (n, size, size), jnp.float32)
                            / size ** 0.5).astype(dtype), out_shardings=sh)
  a, b = make(jax.random.key(1)), make(jax.random.key(2))
  mm = jax.jit(lambda x, y: jnp.einsum("nij,njk->nik", x, y), out_shardings=sh)
  return mm, a, b


def measure_peak(devices, size: int = 0, reps: int = 10, dtype: str = "float32") -> dict:
  """Best matmul throughput of `devices` in `dtype`: one [size]³ matmul per device, all at
  once (size 0: 2048 on CPU, 8192 on accelerators)."""
  import jax   # noqa: PLC0415
  n = len(devices)
  size = size or (2048 if devices[0].platform == "cpu" else 8192)
  mm, a, b = peak_matmul(devices, size, dtype)
  for _ in range(2):
    jax.block_until_ready(mm(a, b))
  times = []
  for _ in range(max(reps, 1)):
    t = time.perf_counter()
    jax.block_until_ready(mm(a, b))
    times.append(time.perf_counter() - t)
  best = min(times)
  total = 2 * n * size ** 3
  return {"peak_flops": total / best, "peak_matmul_s": best, "peak_dtype": dtype,
          "peak_definition": (f"best of {len(times)} timed calls (after 2 warm-up calls) of one "
                              f"jitted {dtype} [{size},{size}]@[{size},{size}] matmul on each "
                              f"of the {n} device(s) at once (batched einsum sharded over "
                              f"devices), default matmul precision; peak = {n}*2*{size}^3 / "
                              "best time")}


# ---------------------------------------------------------------------------------------------
# The synthetic batch and the run
# ---------------------------------------------------------------------------------------------


def prompt_length(seq: int, fraction: float) -> int:
  return min(max(int(round(seq * fraction)), 1), seq - 1)


def synthetic_batch(b: int, seq: int, vocab: int, prompt_len: int, *, unpaired: bool = False,
                    columns=(), seed: int = 0):
  """2b rows [chosen; rejected] of random tokens, each a full `seq` long (no padding), with the
  trainer's batch keys (data/preference.collate) and any per-sequence columns asked for."""
  import numpy as np   # noqa: PLC0415
  rng = np.random.default_rng(seed)
  r = 2 * b
  loss_mask = np.zeros((r, seq), np.float32)
  loss_mask[:, prompt_len:] = 1.0
  batch = {
      "tokens": rng.integers(0, vocab, (r, seq), dtype=np.int32),
      "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (r, seq)).copy(),
      "segment_ids": np.ones((r, seq), np.int32),
      "loss_mask": loss_mask,
      "seq_index": np.broadcast_to(np.arange(r, dtype=np.int32)[:, None], (r, seq)).copy(),
      "valid": np.ones((b,), np.float32),
      "label": (np.arange(b) % 2 == 0).astype(np.float32) if unpaired else np.ones((b,),
                                                                                  np.float32),
  }
  for name in columns:   # e.g. precomputed reference log-probs, teacher log-probs: [2b]
    batch[name] = rng.normal(-(seq - prompt_len), 1.0, (r,)).astype(np.float32)
  return batch


def shared_batch(batch: dict, prompt_len: int, k: int, *, unpaired: bool = False,
                 columns=(), score_parts: int) -> dict:
  """synthetic_batch's pairs with the chosen row's prompt shared by both completions, packed one
  pair per row [prompt | chosen | rejected] (data/packing.py, share_prompt) into k micro-batches.
  Unpaired batches pair each completion with the next example's, as the trainer does."""
  from dpo_jax.data import packing   # noqa: PLC0415
  from dpo_jax.data.preference import Tokenized   # noqa: PLC0415
  tokens, label = batch["tokens"], batch["label"]
  b, seq = label.shape[0], tokens.shape[1]
  examples = [Tokenized(list(tokens[i, :prompt_len]), list(tokens[i, prompt_len:]),
                        None if unpaired else list(tokens[b + i, prompt_len:]), float(label[i]))
              for i in range(b)]
  return packing.pack_microbatches(
      examples, k, row_length=2 * seq - prompt_len, row_buckets=(b // k,), pad_id=0,
      max_length=seq, columns={name: batch[name] for name in columns}, share_prompt=True,
      score_parts=score_parts)


def train_config(c: ml_collections.ConfigDict, data_path: str) -> ml_collections.ConfigDict:
  """The training config setup() takes: batch_size = batch; the data source is a tiny synthetic
  JSONL (setup tokenises it; the benchmark feeds its own batches) or, with data_path None,
  config.data.train itself, all of it for training (no held-out part)."""
  t = c.copy_and_resolve_references()
  t.unlock()
  for k in BENCH_KEYS:
    del t[k]
  t.batch_size = c.batch
  t.steps = c.warmup + c.steps
  if data_path is not None:
    t.data.train = data_path
  t.data.eval = None
  t.data.eval_fraction = 0.0
  t.lock()
  return t


def write_rows(path: str, n: int, unpaired: bool):
  with open(path, "w") as f:
    for i in range(n):
      row = ({"prompt": "ab", "completion": "cd", "label": i % 2 == 0} if unpaired
             else {"prompt": "ab", "chosen": "cd", "rejected": "ef"})
      f.write(json.dumps(row) + "\n")


def _memory(compiled) -> dict:
  out = {}
  try:
    ma = compiled.memory_analysis()
  except Exception:   # noqa: BLE001 (not every backend implements it)
    ma = None
  if ma is not None:
    get = lambda name: int(getattr(ma, name, 0) or 0)
    out["memory"] = {k: get(k + "_in_bytes") for k in (
        "argument_size", "output_size", "alias_size", "temp_size", "generated_code_size")}
    m = out["memory"]
    out["peak_bytes"] = (m["argument_size"] + m["output_size"] - m["alias_size"]
                         + m["temp_size"])
  return out


def _cost(compiled) -> dict:
  try:
    cost = compiled.cost_analysis()
  except Exception:   # noqa: BLE001
    return {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = cost or {}
  return {k2: float(cost[k1]) for k1, k2 in (("flops", "xla_cost_flops"),
                                              ("bytes accessed", "xla_cost_bytes_accessed"))
          if k1 in cost}


def prepare(c: ml_collections.ConfigDict, devices=None):
  """The trainer's Run for config `c` (get_config()'s keys) and the synthetic batch on its
  devices. Returns (run, batch, layout) with layout = dict(rows, row_len, prompt_len,
  setup_s, grad_accum)."""
  from dpo_jax import build, losses, train   # noqa: PLC0415
  from dpo_jax.data import preference   # noqa: PLC0415
  if c.batch < 1 or c.seq < 2:
    raise ValueError(f"config.batch={c.batch} must be >= 1 and config.seq={c.seq} >= 2")
  spec = losses.get(c.loss.name)
  with tempfile.TemporaryDirectory(prefix="dpo_jax_bench_") as tmp:
    data_path = os.path.join(tmp, "rows.jsonl")
    write_rows(data_path, max(c.batch, 2), spec.unpaired)
    tc = train_config(c, data_path)
    t0 = time.perf_counter()
    run = build.setup(tc, devices, workdir=tmp)
    setup_s = time.perf_counter() - t0
  prompt_len = prompt_length(c.seq, c.prompt_fraction)
  columns = []
  if run.reference.mode == "precomputed":
    columns += ["ref_logps"] + [f"ref_{s}" for s in train.side_stats(spec, train.REF_STATS)]
  if run.teacher.mode == "precomputed":
    columns.append("teacher_logps")
  batch_np = synthetic_batch(c.batch, c.seq, run.model_cfg.vocab_size, prompt_len,
                             unpaired=spec.unpaired, columns=columns, seed=c.seed)
  parts = run.train_data.score_parts
  if c.share_prompt:   # c.batch rows of seq + completion tokens
    batch_np = shared_batch(batch_np, prompt_len, tc.grad_accum, unpaired=spec.unpaired,
                            columns=columns, score_parts=parts)
    rows, row_len = c.batch, 2 * c.seq - prompt_len
  else:                # 2·c.batch rows of seq tokens
    batch_np = train.microbatches(preference.add_score_index(batch_np, parts), tc.grad_accum)
    rows, row_len = 2 * c.batch, c.seq
  scored = batch_np["score_index"].shape[-1] if "score_index" in batch_np else row_len
  layout = {"rows": rows, "row_len": row_len, "prompt_len": prompt_len, "setup_s": setup_s,
            "grad_accum": tc.grad_accum, "scored": scored}
  return run, build.to_device(batch_np, run), layout


def prepare_data(c: ml_collections.ConfigDict, devices=None):
  """config.from_data: the trainer's Run on config.data.train and the host batches of its first
  warmup + steps steps (train.train_batch: bucketed, packed or prompt-shared rows as the data
  config says). Returns (run, batches, setup_s)."""
  from dpo_jax import build, train   # noqa: PLC0415
  if c.share_prompt:
    raise ValueError("config.share_prompt lays out the synthetic batch; with "
                     "config.from_data=True set config.data.share_prompt instead")
  if c.batch < 1:
    raise ValueError(f"config.batch={c.batch} must be >= 1")
  with tempfile.TemporaryDirectory(prefix="dpo_jax_bench_") as tmp:
    tc = train_config(c, None)
    t0 = time.perf_counter()
    run = build.setup(tc, devices, workdir=tmp)
    build.check_vocabulary(run)
    setup_s = time.perf_counter() - t0
  batches = [train.train_batch(run.train_data, i, tc.grad_accum)
             for i in range(c.warmup + c.steps)]
  return run, batches, setup_s


def batch_layout(batch: dict) -> dict:
  """rows, row_len, scored (unembedding positions per row) and padding of a [k, rows, L] step
  batch, as the step computes it."""
  import numpy as np   # noqa: PLC0415
  k, r, row_len = batch["tokens"].shape
  scored = batch["score_index"].shape[-1] if "score_index" in batch else row_len
  return {"rows": k * r, "row_len": row_len, "scored": scored,
          "pad_fraction": float(np.mean(np.asarray(batch["segment_ids"]) == 0))}


def sequence_tokens(data, step: int) -> int:
  """Tokens of the sequences in batch `step` of `data` (preference.Batches), counted as the
  unshared layout has them: a pair's prompt once in each of its two sequences."""
  lens = data.examples.lens[data.indices(step)].astype("int64")
  paired = lens[:, 2] >= 0
  return int(lens[:, 0].sum() + lens[:, 1].sum() + (lens[:, 0] + lens[:, 2])[paired].sum())


def run_bench(c: ml_collections.ConfigDict, devices=None, log=None) -> dict:
  """Builds the trainer's step for config `c` (get_config()'s keys), times it, returns the
  result row."""
  import jax   # noqa: PLC0415
  import numpy as np   # noqa: PLC0415
  from dpo_jax import build, train   # noqa: PLC0415

  log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
  if c.steps < 1:
    raise ValueError(f"config.steps={c.steps} (timed steps) must be >= 1")
  if c.warmup < 0:
    raise ValueError(f"config.warmup={c.warmup} (untimed steps) must be >= 0")
  dtype = peak_dtype(c)   # a bad config.peak.dtype fails before the step is built
  n = c.warmup + c.steps
  if c.from_data:   # each step's own batch, built and placed inside its timed interval
    run, host, setup_s = prepare_data(c, devices)
    layouts = [batch_layout(b) for b in host]
    tokens = [sequence_tokens(run.train_data, i) for i in range(n)]
    k = run.config.grad_accum
    feed = lambda i: build.to_device(train.train_batch(run.train_data, i, k), run)
    prompt_len, seq = None, run.config.data.max_length
  else:             # one synthetic batch, placed once
    run, batch, layout = prepare(c, devices)
    host = [batch] * n
    layouts = [{"rows": layout["rows"], "row_len": layout["row_len"],
                "scored": layout["scored"], "pad_fraction": 0.0}] * n
    tokens = [2 * c.batch * c.seq] * n
    feed = lambda i: batch
    prompt_len, seq, setup_s = layout["prompt_len"], c.seq, layout["setup_s"]
  spec, cfg, frozen, te = run.spec, run.model_cfg, run.frozen, run.teacher
  reference_forward = run.ref_params is not None and spec.needs_ref
  teacher_params = te.params

  step = run.jit_train_step()
  signatures = [train.batch_signature(b) for b in host]
  log(f"bench: compiling the step ({c.batch} pairs x {seq} tokens, {cfg.num_layers} layers, "
      f"d={cfg.hidden_size}, {len(run.mesh.devices.flat)} device(s), "
      f"{len(set(signatures))} batch shape(s))")
  t0 = time.perf_counter()
  programs = {}
  for i, sig in enumerate(signatures):
    if sig not in programs:
      programs[sig] = step.lower(run.state, frozen, feed(i)).compile()
  compile_s = time.perf_counter() - t0

  state, metrics = run.state, None
  times, faults = [], [_minor_faults()]
  cpu0 = wall0 = None
  for i in range(n):
    if i == c.warmup:
      faults = [_minor_faults()]
      cpu0, wall0 = time.process_time(), time.perf_counter()
    t = time.perf_counter()
    state, metrics = programs[signatures[i]](state, frozen, feed(i))
    jax.block_until_ready((state, metrics))
    if i >= c.warmup:
      times.append(time.perf_counter() - t)
      faults.append(_minor_faults())
  cpu_util = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
  step_faults = None if faults[0] is None else np.diff(faults)
  usage = _rusage()
  host_rss = None if usage is None else usage.ru_maxrss * 1024   # Linux reports KiB
  loss = float(jax.device_get(metrics["loss"]))
  # One synthetic batch: every step does the same work, the median is robust to a noisy host.
  # Real batches differ step to step: the mean is what an epoch of them takes.
  step_stat = "mean" if c.from_data else "median"
  step_s = float(np.mean(times) if c.from_data else np.median(times))
  log(f"bench: step {step_s * 1e3:.1f} ms ({step_stat} of {len(times)}), measuring the matmul "
      "peak")

  devices_used = list(run.mesh.devices.flat)
  peak = measure_peak(devices_used, c.peak.size, c.peak.reps, dtype)
  timed = layouts[c.warmup:]
  per_step = [flops(cfg, c.batch, lay["row_len"], reference_forward, teacher_params,
                    rows=lay["rows"], scored=lay["scored"]) for lay in timed]
  fl, rows, row_len = dict(per_step[0]), timed[0]["rows"], timed[0]["row_len"]
  tokens_per_step = tokens[0]
  if c.from_data:   # means over the timed batches
    mean = lambda xs: float(np.mean(xs))
    fl["flops_per_step"] = mean([f["flops_per_step"] for f in per_step])
    fl["scored_per_row"] = mean([lay["scored"] for lay in timed])
    rows, row_len = mean([lay["rows"] for lay in timed]), mean([lay["row_len"] for lay in timed])
    tokens_per_step = mean(tokens[c.warmup:])
  memories = [_memory(p) for p in programs.values()]
  memory = max(memories, key=lambda m: m.get("peak_bytes", 0))
  biggest = list(programs.values())[memories.index(memory)]
  dev = devices_used[0]
  device_peak = None
  try:
    stats = dev.memory_stats()
    if stats and "peak_bytes_in_use" in stats:
      device_peak = int(stats["peak_bytes_in_use"])
  except Exception:   # noqa: BLE001
    pass
  row = {
      "pairs_per_s": c.batch / step_s,
      "tokens_per_s": tokens_per_step / step_s,
      "step_s": step_s,
      "step_s_mean": float(np.mean(times)),
      "step_s_min": float(np.min(times)),
      "step_s_max": float(np.max(times)),
      "steps_timed": len(times),
      "warmup": c.warmup,
      "compile_s": compile_s,
      # Process CPU seconds per wall second while timing: ~ the number of busy cores (on a
      # shared CPU host, less than the thread count means the step was starved).
      "cpu_util": cpu_util,
      # Page faults per timed step (mean and the largest): memory the step's buffers take fresh
      # from the OS. Tens of thousands every step on CPU means 4 KiB pages re-faulted each call;
      # DPO_JAX_CPU_MALLOC=heap (dpo_jax.hostmem) keeps the step's buffer for the next step
      # instead, apart from an occasional step where the heap grows (the max).
      "minor_faults_per_step": None if step_faults is None else float(np.mean(step_faults)),
      "minor_faults_max_step": None if step_faults is None else int(np.max(step_faults)),
      # The process's peak resident memory by the end of the timed steps (compile included).
      "host_rss_peak_bytes": host_rss,
      "cpu_malloc": hostmem.in_effect(),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      "ld_preload": os.environ.get("LD_PRELOAD", ""),
      "setup_s": setup_s,
      "mfu": fl["flops_per_step"] / step_s / peak["peak_flops"],
      "achieved_flops": fl["flops_per_step"] / step_s,
      **fl,
      **peak,
      **memory,
      "device_peak_bytes": device_peak,
      **_cost(biggest),
      "peak_bytes_definition": ("argument + output - alias (donated) + temp bytes of the "
                                "compiled step (XLA memory_analysis; with several batch "
                                "shapes, the largest program's)"),
      "tokens_per_s_definition": (
          "tokens of the step's chosen and rejected sequences (a shared prompt counted in "
          "both) per second: " + ("their mean over the timed batches" if c.from_data
                                  else "2*batch*seq")),
      "timing_definition": (
          f"{step_stat} over {len(times)} steps of one compiled-step call until "
          f"block_until_ready, after compiling every batch shape and {c.warmup} warm-up steps; "
          + ("each step's batch built from the data (train.train_batch) and placed on the "
             "devices inside its interval" if c.from_data else "batch already on device")),
      "step_s_stat": step_stat,
      # Shapes and numerics.
      "batch": c.batch, "seq": seq, "prompt_len": prompt_len, "rows": rows,
      "row_length": row_len,
      "share_prompt": bool(run.config.data.share_prompt if c.from_data else c.share_prompt),
      "tokens_per_step": tokens_per_step,
      "tokens_computed_per_step": (float(np.mean([lay["rows"] * lay["row_len"]
                                                  for lay in timed]))
                                   if c.from_data else rows * row_len),
      "grad_accum": run.config.grad_accum,
      "from_data": bool(c.from_data),
      "programs_compiled": len(programs),
      "data": ({"train": str(run.config.data.train), "examples": len(run.train_data),
                "packing": bool(run.config.data.packing),
                "epochs_timed": c.steps * c.batch / len(run.train_data),
                "pad_fraction": float(np.mean([lay["pad_fraction"] for lay in timed]))}
               if c.from_data else None),
      "model": {**{k: v for k, v in cfg.architecture() if v is not None
                   and not isinstance(v, tuple)},
                "head_dim": cfg.dim_per_head, "n_params": cfg.num_params()},
      "dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "remat": cfg.remat,
      "logprob_chunk": c.logprob_chunk,
      "loss": c.loss.name, "loss_value": loss,
      "reference_mode": run.reference.mode, "reference_forward": reference_forward,
      "teacher_mode": te.mode,
      "mesh": {k: int(v) for k, v in run.mesh.shape.items()},
      "devices": {"platform": dev.platform, "kind": dev.device_kind,
                  "count": len(devices_used)},
      "jax": jax.__version__, "host": platform.node(), "cpu_count": os.cpu_count(),
      "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  if not np.isfinite(loss):
    log(f"bench: warning: the loss after {c.warmup + c.steps} steps is {loss}")
  return row


def _rusage():
  """This process's resource usage, or None off POSIX."""
  try:
    import resource   # noqa: PLC0415 (POSIX only)
  except ImportError:
    return None
  return resource.getrusage(resource.RUSAGE_SELF)


def _minor_faults():
  usage = _rusage()
  return None if usage is None else usage.ru_minflt


def format_row(row: dict) -> str:
  m, d = row["model"], row["data"]
  if d:
    layout = ("shared prompts" if row["share_prompt"] else "packed" if d["packing"]
              else "bucketed")
    shape = (f"{row['batch']} pairs/step from {d['train']} ({d['examples']} examples, "
             f"{layout}: {row['rows']:.1f} rows x {row['row_length']:.0f} on average, "
             f"{d['pad_fraction'] * 100:.1f}% padding, {row['programs_compiled']} batch shapes)")
  else:
    shape = (f"{row['batch']} pairs x {row['seq']} tokens (prompt {row['prompt_len']}"
             f"{', shared: ' + str(row['rows']) + ' rows of ' + str(row['row_length']) if row['share_prompt'] else ''})")
  lines = [
      f"shape        {shape}, "
      f"{m['family']} d={m['hidden_size']} layers={m['num_layers']} heads={m['num_heads']}/"
      f"{m['num_kv_heads']} ffn={m['intermediate_size']} vocab={m['vocab_size']}, "
      f"{row['dtype']}, remat={row['remat']}, loss={row['loss']}, ref={row['reference_mode']}",
      f"devices      {row['devices']['count']} x {row['devices']['kind']} mesh={row['mesh']}",
      f"step         {row['step_s'] * 1e3:.1f} ms {row['step_s_stat']} ({row['steps_timed']} steps; min "
      f"{row['step_s_min'] * 1e3:.1f}, max {row['step_s_max'] * 1e3:.1f}); compile "
      f"{row['compile_s']:.1f} s",
      f"throughput   {row['pairs_per_s']:.2f} pairs/s, {row['tokens_per_s']:.0f} tokens/s",
      f"flops        {row['flops_per_step'] / 1e9:.2f} GFLOP/step -> "
      f"{row['achieved_flops'] / 1e9:.1f} GFLOP/s",
      f"peak         {row['peak_flops'] / 1e9:.1f} GFLOP/s measured ({row['peak_definition']})",
      f"mfu          {row['mfu'] * 100:.1f}%",
      f"memory       {row.get('peak_bytes', 0) / 2**20:.1f} MiB ({row['peak_bytes_definition']})",
      f"page faults  {row['minor_faults_per_step'] or 0:.0f} minor faults per step, at most "
      f"{row['minor_faults_max_step'] or 0} in one (DPO_JAX_CPU_MALLOC={row['cpu_malloc']}, "
      f"GLIBC_TUNABLES={row['glibc_tunables']!r}, LD_PRELOAD={row['ld_preload']!r})",
      f"host memory  {(row['host_rss_peak_bytes'] or 0) / 2**20:.0f} MiB peak resident",
      f"definition   {row['flops_definition']}",
  ]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

try:   # a config_dict flag with a default applies the --config.* overrides as it is defined
  _CONFIG = config_flags.DEFINE_config_dict("config", get_config(), "Benchmark config.",
                                            lock_config=True)
except (KeyError, AttributeError) as e:
  configlib.exit_unknown_key(e, sys.argv)
_JSON = flags.DEFINE_bool("json", False, "Print exactly one JSON line to stdout.")


def json_line(row: dict) -> str:
  """The row as strict JSON: a non-finite number (a diverged loss) is null."""
  def finite(v):
    if isinstance(v, dict):
      return {k: finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
      return [finite(x) for x in v]
    return None if isinstance(v, float) and not math.isfinite(v) else v
  return json.dumps(finite(row), allow_nan=False)


def main(argv):
  del argv
  from absl import logging   # noqa: PLC0415
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  with contextlib.redirect_stdout(sys.stderr):   # stray prints never corrupt the JSON line
    row = run_bench(config)
  if _JSON.value:
    sys.stdout.write(json_line(row) + "\n")
  else:
    print(format_row(row))
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main, flags_parser=configlib.parse_flags)
