"""dpo_jax vs TRL's DPOTrainer on the same shapes, in the same run; prints the ratio.

    python benchmarks/trl_side_by_side.py                # the issue's shape (below)
    python benchmarks/trl_side_by_side.py --batch 4 --seq 128 --rounds 2 --json out.json

Default shape: Llama, hidden 256, 4 layers, 4 heads (4 kv heads: plain multi-head attention),
intermediate 1024, vocab 2048, 8 pairs x 256 tokens (prompt 128 + completion 128, no padding),
f32 everywhere, 2 CPU threads, random init, DPO (sigmoid, beta 0.1), reference = initial policy
(a reference forward every step on both sides), AdamW with global-norm clipping 1.0 on both.

dpo_jax: `python -m dpo_jax.bench --json` in a subprocess, with the shape as --config overrides,
the process pinned to `--threads` CPUs (sched_setaffinity) and
XLA_FLAGS=--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=<threads>.
Timed: the median of `--steps` compiled-step calls, each until block_until_ready, after
compilation and `--warmup` steps.

TRL: in this process after torch.set_num_threads(threads) and the same CPU affinity. Two timings
of the same DPOTrainer (both reported; the ratio uses the faster, i.e. TRL's best case):
  trainer  DPOTrainer.train() for warmup+steps optimizer steps; the time of each step is the
           interval between consecutive on_step_end callbacks (data loading, collation,
           forward/backward of policy and reference, clipping, AdamW, scheduler, TRL's metric
           bookkeeping); median of the last `--steps`.
  loop     the training step without the Trainer loop: trainer.compute_loss(model, batch)
           (policy forward + reference forward under no_grad, DPO loss, TRL metrics),
           loss.backward(), clip_grad_norm_(1.0), optimizer.step(), zero_grad(), on one
           collated batch; median of `--steps` after `--warmup`.
--share-prompt both (default) also times dpo_jax with data.share_prompt: each pair is one row
[prompt | chosen | rejected], so the prompt is computed once (8 rows of 384 tokens instead of 16
of 256 on the default shape). The pairs and the loss are the same; TRL has no such layout, so
that ratio compares the two trainers as a user would run them, not the same FLOPs.
Attention: dpo_jax runs with model.attention_chunk=64 (`--attention-chunk`; 0 = one [L, L]
block): causal attention in query chunks, each against the keys up to its end, so the blocks
above the diagonal are skipped as in TRL's torch SDPA(is_causal=True) kernel. On this CPU it
makes dpo_jax's attention 1.4-1.6x faster (benchmarks/attention_alone.py). The FLOP count is
the same on both sides and counts every key.
--lengths realistic: the same pairs of chat-like, varying lengths up to --seq on both sides
(realistic_data), each trainer batching them its own way: dpo_jax bucketed, packed and with
shared prompts (dpo_jax.bench --config.from_data, each step's batch built inside its timed
interval), TRL padded to the longest sequence of each batch. batch x steps pairs; each side
trains two epochs of them and the second is timed (mean step). Compares the trainers as a user
runs them on real data, not the same FLOPs.
Rematerialisation is matched: --remat none (default) = dpo_jax model.remat=none and TRL
gradient_checkpointing=False; --remat full = dpo_jax remat=full and gradient_checkpointing=True.

TRL and its dependency accelerate are optional extras: when `import trl` fails, this installs
trl==1.16.0 and accelerate==1.15.0 with pip, constrained to the torch and transformers already
installed (they are never upgraded or downgraded; torch itself is installed as torch==2.13.0
when missing).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRL_VERSION = "1.16.0"          # verified with transformers 5.23.0 and torch 2.13.0 (CPU)
ACCELERATE_VERSION = "1.15.0"
TORCH_VERSION = "2.13.0"


def log(msg):
  print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Optional extras
# ---------------------------------------------------------------------------------------------


def _pip(*args):
  cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
  log("+ " + " ".join(cmd))
  subprocess.run(cmd, check=True)


def ensure_trl():
  """Imports trl, installing it (and torch) first if needed, never touching the installed
  torch / transformers."""
  try:
    import torch   # noqa: F401, PLC0415
  except ImportError:
    _pip(f"torch=={TORCH_VERSION}")
  import torch   # noqa: PLC0415
  import transformers   # noqa: PLC0415
  pinned = (torch.__version__, transformers.__version__)
  try:
    import trl   # noqa: PLC0415
    return trl
  except ImportError:
    pass
  with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
    f.write(f"torch=={torch.__version__}\ntransformers=={transformers.__version__}\n")
    constraints = f.name
  try:
    _pip("-c", constraints, f"trl=={TRL_VERSION}", f"accelerate=={ACCELERATE_VERSION}")
  finally:
    os.unlink(constraints)
  importlib.invalidate_caches()
  import trl   # noqa: PLC0415
  now = (torch.__version__, transformers.__version__)
  if now != pinned:   # the loaded modules are the old ones anyway; say so loudly
    raise RuntimeError(f"installing trl changed torch/transformers {pinned} -> {now}")
  return trl


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
  p.add_argument("--intermediate", type=int, default=1024)
  p.add_argument("--vocab", type=int, default=2048)
  p.add_argument("--batch", type=int, default=8, help="preference pairs per step")
  p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
  p.add_argument("--prompt-fraction", type=float, default=0.5)
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--scan_layers", choices=("True", "False"), default="False",
                 help="dpo_jax model.scan_layers (False: unrolled layers, faster on CPU; TRL's "
                      "PyTorch loop over layers is unrolled too)")
  p.add_argument("--remat", choices=("none", "full"), default="none",
                 help="none: dpo_jax remat=none, TRL gradient_checkpointing=False; "
                      "full: remat=full, gradient_checkpointing=True")
  p.add_argument("--attention-chunk", type=int, default=64,
                 help="dpo_jax model.attention_chunk (query chunks skipping the masked blocks, "
                      "like TRL's causal SDPA; 0: one [L, L] block)")
  p.add_argument("--rounds", type=int, default=1,
                 help="alternate dpo_jax and TRL this many times; the best round of each counts")
  p.add_argument("--trl-timing", choices=("both", "trainer", "loop"), default="both")
  p.add_argument("--skip-trl", action="store_true")
  p.add_argument("--skip-jax", action="store_true")
  p.add_argument("--jax-flag", action="append", default=[],
                 help="extra dpo_jax.bench flag, e.g. --jax-flag=--config.logprob_chunk=128")
  p.add_argument("--share-prompt", choices=("both", "off", "only"), default="both",
                 help="dpo_jax with data.share_prompt (one row per pair [prompt | chosen | "
                      "rejected], the prompt computed once; TRL has no such layout): both = "
                      "time dpo_jax with and without it, off = without, only = with")
  p.add_argument("--malloc-hugetlb", choices=("on", "off"), default="off",
                 help="on: rerun this script with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, so "
                      "that both dpo_jax (a child process) and TRL (this process) get "
                      "large allocations on transparent huge pages instead of re-faulting "
                      "4 KiB pages every step. Off by default: it cuts dpo_jax's page faults "
                      "but slowed TRL by about 1.7x here (benchmarks/README.md)")
  p.add_argument("--cpu-malloc", choices=("system", "heap"), default="system",
                 help="DPO_JAX_CPU_MALLOC for both sides (dpo_jax.hostmem). system (default): "
                      "malloc as is. heap: large freed buffers stay on glibc's main heap for "
                      "reuse, so XLA:CPU's step buffer is not mapped and page-faulted afresh "
                      "every step (docs/performance.md)")
  p.add_argument("--preload", default="",
                 help="a malloc library to LD_PRELOAD into both sides, e.g. "
                      "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 (Debian: apt install "
                      "libtcmalloc-minimal4): the script re-runs itself with it, so TRL (this "
                      "process) and dpo_jax (its child) get the same allocator")
  p.add_argument("--lengths", choices=("fixed", "realistic"), default="fixed",
                 help="fixed (default): every sequence --seq tokens, no padding, one batch "
                      "timed over and over. realistic: batch x steps pairs of chat-like "
                      "lengths up to --seq (realistic_data), the same rows on both sides, "
                      "each trainer's own batching (dpo_jax: bucketed, packed and "
                      "shared-prompt rows; TRL: padded to the longest in the batch); one "
                      "epoch warms up, the next is timed, mean step")
  p.add_argument("--data-dir", default=None,
                 help="--lengths realistic: write the pairs (pairs.jsonl) and the word "
                      "tokenizer (tokenizer/) here and keep them (default: a temporary "
                      "directory), e.g. for benchmarks/attention_skip.py or op_profile.py "
                      "--config.from_data=True")
  p.add_argument("--json", default=None, help="also write all results to this JSON file")
  args = p.parse_args(argv)
  if args.data_dir and args.lengths != "realistic":
    p.error("--data-dir applies to --lengths realistic")
  if args.preload and not os.path.isfile(args.preload):
    p.error(f"--preload {args.preload}: no such file")
  args.kv_heads = args.kv_heads or args.heads
  args.prompt_len = min(max(int(round(args.seq * args.prompt_fraction)), 1), args.seq - 1)
  return args


def cpu_set(threads: int):
  try:
    cpus = sorted(os.sched_getaffinity(0))
  except AttributeError:
    return None
  return set(cpus[:threads])


# ---------------------------------------------------------------------------------------------
# dpo_jax
# ---------------------------------------------------------------------------------------------


def run_dpo_jax(args, share_prompt: bool = False, extra=(), warmup=None) -> dict:
  """dpo_jax.bench --json on the shape, pinned to the threads; `extra`: more --config flags;
  warmup: untimed steps (default --warmup)."""
  warmup = args.warmup if warmup is None else warmup
  cmd = [sys.executable, "-m", "dpo_jax.bench", "--json",
         f"--config.model.hidden_size={args.hidden}", f"--config.model.num_layers={args.layers}",
         f"--config.model.num_heads={args.heads}", f"--config.model.num_kv_heads={args.kv_heads}",
         f"--config.model.intermediate_size={args.intermediate}",
         f"--config.model.vocab_size={args.vocab}", "--config.model.tie_word_embeddings=False",
         "--config.model.dtype=float32", "--config.model.param_dtype=float32",
         f"--config.model.remat={args.remat}", f"--config.model.scan_layers={args.scan_layers}",
         f"--config.model.attention_chunk={args.attention_chunk}", f"--config.batch={args.batch}",
         f"--config.seq={args.seq}", f"--config.prompt_fraction={args.prompt_len / args.seq}",
         f"--config.steps={args.steps}", f"--config.warmup={warmup}",
         f"--config.model.max_position_embeddings={max(args.seq, 1024)}",
         "--config.loss.name=dpo", "--config.loss.beta=0.1", "--config.reference.mode=initial",
         "--config.mesh.data=1", f"--config.share_prompt={share_prompt}", *extra,
         *args.jax_flag]
  env = dict(os.environ)
  env["XLA_FLAGS"] = (f"--xla_cpu_multi_thread_eigen=true "
                      f"intra_op_parallelism_threads={args.threads}")
  env["JAX_PLATFORMS"] = "cpu"
  env["DPO_JAX_CPU_MALLOC"] = args.cpu_malloc
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  cpus = cpu_set(args.threads)
  log("+ " + " ".join(cmd))
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                       preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
  if out.returncode != 0:
    raise RuntimeError(f"dpo_jax.bench failed:\n{out.stderr[-4000:]}")
  lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
  if len(lines) != 1:
    raise RuntimeError(f"dpo_jax.bench --json printed {len(lines)} lines:\n{out.stdout}")
  return json.loads(lines[0])


# ---------------------------------------------------------------------------------------------
# TRL
# ---------------------------------------------------------------------------------------------


def word_tokenizer(vocab: int):
  """A whitespace word-level tokenizer: '<pad>' = 0, '</s>' = 1 and 't2' .. 't{V-1}', so that
  text 't5 t9' -> [5, 9]."""
  from tokenizers import Tokenizer, models, pre_tokenizers   # noqa: PLC0415
  from transformers import PreTrainedTokenizerFast   # noqa: PLC0415
  words = {"<pad>": 0, "</s>": 1, **{f"t{i}": i for i in range(2, vocab)}}
  tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<pad>", pad_token="<pad>",
                                 eos_token="</s>")


def synthetic_rows(n: int, vocab: int, prompt_len: int, seq: int, seed: int = 0):
  """Random-token pairs: prompt of prompt_len tokens, completions of seq - prompt_len tokens
  (ending in the EOS token, so that TRL adds none)."""
  import numpy as np   # noqa: PLC0415
  rng = np.random.default_rng(seed)
  words = lambda ids: " ".join("</s>" if i == 1 else f"t{i}" for i in ids)
  c = seq - prompt_len
  rows = {"prompt": [], "chosen": [], "rejected": []}
  for _ in range(n):
    rows["prompt"].append(words(rng.integers(2, vocab, prompt_len)) + " ")
    for key in ("chosen", "rejected"):
      rows[key].append(words(list(rng.integers(2, vocab, c - 1)) + [1]))
  return rows


def realistic_data(args, directory: str) -> dict:
  """batch x steps random-token pairs with chat-like lengths (dpo_jax.data.packing's
  UltraFeedback-like lognormals scaled from 1024 to --seq tokens: prompts median 150/1024 seq,
  at most seq/2; completions median 250/1024 seq; prompt + completion <= seq, EOS included),
  written for both sides: a JSONL for dpo_jax (which appends the EOS itself) and TRL's rows
  (completions ending in the EOS word, so that TRL adds none), and the word tokenizer saved for
  dpo_jax. Returns their paths, TRL's rows and the (prompt, chosen, rejected) token totals."""
  import numpy as np   # noqa: PLC0415
  from dpo_jax.data import packing   # noqa: PLC0415
  n, seq = args.batch * args.steps, args.seq
  lengths, prompt = packing.realistic_lengths(
      n, seed=0, max_length=seq, max_prompt_length=seq // 2, prompt_median=150 * seq / 1024,
      completion_median=250 * seq / 1024, with_prompt=True)
  completion = np.maximum(lengths - prompt[:, None], 2)   # >= 1 word + EOS
  rng = np.random.default_rng(0)
  words = lambda k: " ".join(f"t{i}" for i in rng.integers(2, args.vocab, k))
  trl_rows = {"prompt": [], "chosen": [], "rejected": []}
  path = os.path.join(directory, "pairs.jsonl")
  with open(path, "w") as f:
    for i in range(n):
      # prompt + completion is the text (both sides' rule): completions start with a space
      row = {"prompt": words(prompt[i]), "chosen": " " + words(completion[i, 0] - 1),
             "rejected": " " + words(completion[i, 1] - 1)}
      f.write(json.dumps(row) + "\n")
      trl_rows["prompt"].append(row["prompt"])
      for key in ("chosen", "rejected"):
        trl_rows[key].append(row[key] + " </s>")
  tokenizer = os.path.join(directory, "tokenizer")
  word_tokenizer(args.vocab).save_pretrained(tokenizer)
  totals = (int(prompt.sum()), int(completion[:, 0].sum()), int(completion[:, 1].sum()))
  return {"jsonl": path, "tokenizer": tokenizer, "trl_rows": trl_rows, "tokens": totals,
          "sequence_tokens": 2 * totals[0] + totals[1] + totals[2], "pairs": n}


LAYOUTS = {"bucketed": (), "packed": ("--config.data.packing=True",),
           "shared prompt": ("--config.data.share_prompt=True",)}


def run_dpo_jax_on(args, data: dict, layout: str) -> dict:
  """dpo_jax.bench --config.from_data on realistic_data's JSONL: one epoch of warm-up steps,
  then one epoch timed (the same pairs TRL's timed epoch has); checks the tokens it counted."""
  row = run_dpo_jax(args, extra=(
      "--config.from_data=True", f"--config.data.train={data['jsonl']}",
      f"--config.model.tokenizer={data['tokenizer']}", f"--config.data.max_length={args.seq}",
      f"--config.data.max_prompt_length={args.seq // 2}", *LAYOUTS[layout]),
      warmup=args.steps)
  if round(row["tokens_per_step"] * row["steps_timed"]) != data["sequence_tokens"]:
    raise RuntimeError(f"dpo_jax timed {row['tokens_per_step'] * row['steps_timed']} sequence "
                       f"tokens, expected the epoch's {data['sequence_tokens']}")
  return row


def build_trainer(args, tmp: str, rows=None, steps=None):
  """TRL's DPOTrainer on the shape; rows (prompt/chosen/rejected texts) default to
  synthetic_rows of the fixed shape, steps to warmup + steps."""
  import torch   # noqa: PLC0415
  from datasets import Dataset   # noqa: PLC0415
  from transformers import LlamaConfig, LlamaForCausalLM   # noqa: PLC0415
  from trl import DPOConfig, DPOTrainer   # noqa: PLC0415

  torch.manual_seed(0)
  hf = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                   intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                   num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                   max_position_embeddings=max(args.seq, 1024), rms_norm_eps=1e-6,
                   tie_word_embeddings=False, bos_token_id=None, eos_token_id=1, pad_token_id=0)
  model = LlamaForCausalLM(hf).to(torch.float32)
  ref = copy.deepcopy(model)
  steps = args.warmup + args.steps if steps is None else steps
  if rows is None:
    rows = synthetic_rows(args.batch * steps, args.vocab, args.prompt_len, args.seq)
  cfg = DPOConfig(
      output_dir=os.path.join(tmp, "trl"), per_device_train_batch_size=args.batch,
      max_steps=steps, learning_rate=5e-4, beta=0.1, loss_type=["sigmoid"],
      max_length=None, bf16=False, fp16=False, use_cpu=True,
      activation_checkpointing=args.remat != "none",
      gradient_checkpointing=args.remat != "none", logging_steps=10 ** 6, save_strategy="no",
      report_to=[], disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=1.0,
      warmup_steps=0, seed=0, precompute_ref_log_probs=False)
  trainer = DPOTrainer(model=model, ref_model=ref, args=cfg,
                       train_dataset=Dataset.from_dict(rows),
                       processing_class=word_tokenizer(args.vocab))
  return trainer


def check_batch(batch, args):
  ids = batch["input_ids"]
  want = (2 * args.batch, args.seq)
  if tuple(ids.shape) != want:
    raise RuntimeError(f"TRL batch has shape {tuple(ids.shape)}, expected {want}")
  n_completion = int(batch["completion_mask"].sum())
  if n_completion != 2 * args.batch * (args.seq - args.prompt_len):
    raise RuntimeError(f"TRL batch has {n_completion} completion tokens, expected "
                       f"{2 * args.batch * (args.seq - args.prompt_len)}")


def summary(times, stat: str = "median") -> dict:
  """Step times -> step_s (their median, or mean when batches differ step to step)."""
  pick = statistics.mean if stat == "mean" else statistics.median
  return {"step_s": pick(times), "step_s_stat": stat, "step_s_min": min(times),
          "step_s_max": max(times), "steps_timed": len(times)}


def time_trl_trainer(trainer, skip: int, stat: str = "median") -> dict:
  """trainer.train(); the steps after the first `skip`, each the interval between consecutive
  on_step_end callbacks."""
  from transformers import TrainerCallback   # noqa: PLC0415
  marks = []

  class Clock(TrainerCallback):
    def on_train_begin(self, *a, **k):
      marks.append(time.perf_counter())

    def on_step_end(self, *a, **k):
      marks.append(time.perf_counter())

  trainer.add_callback(Clock())
  trainer.train()
  return summary([b - a for a, b in zip(marks, marks[1:])][skip:], stat)


def time_trl_loop(trainer, batches, skip: int, stat: str = "median") -> dict:
  """compute_loss + backward + clip + AdamW step on each of `batches`; the steps after the
  first `skip`. Also the token slots (padded) and real tokens of the timed batches."""
  import torch   # noqa: PLC0415
  model = trainer.model
  model.train()
  opt = trainer.optimizer or trainer.create_optimizer()
  times, slots, real = [], 0, 0
  for i, batch in enumerate(batches):
    t = time.perf_counter()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i >= skip:
      times.append(time.perf_counter() - t)
      slots += batch["attention_mask"].numel()
      real += int(batch["attention_mask"].sum())
  return {**summary(times, stat), "loss": float(loss.detach()),
          "pad_fraction": 1 - real / slots, "slots_per_step": slots / len(times)}


def check_tokens(trainer, want):
  """TRL tokenised the realistic rows to exactly the lengths drawn: (prompt, chosen,
  rejected) token totals, completions with their EOS."""
  ds = trainer.train_dataset
  got = tuple(sum(len(x) for x in ds[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
  if got != tuple(want):
    raise RuntimeError(f"TRL tokenised {got} (prompt, chosen, rejected) tokens, expected {want}")


def run_trl(args, data=None) -> dict:
  """TRL's timings on the fixed shape, or with `data` (realistic_data's) over two epochs of
  its rows, the second one timed (mean step: the batches differ in length)."""
  trl = ensure_trl()
  import warnings   # noqa: PLC0415
  warnings.filterwarnings("ignore", category=FutureWarning)
  warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")
  os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
  import datasets   # noqa: PLC0415
  datasets.disable_progress_bars()
  import torch   # noqa: PLC0415
  import transformers   # noqa: PLC0415
  torch.set_num_threads(args.threads)
  cpus = cpu_set(args.threads)
  if cpus:
    os.sched_setaffinity(0, cpus)
  out = {"trl": trl.__version__, "torch": torch.__version__,
         "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
         "gradient_checkpointing": args.remat != "none"}
  if data is None:
    rows, steps, skip, stat = None, args.warmup + args.steps, args.warmup, "median"
  else:
    rows, steps, skip, stat = data["trl_rows"], 2 * args.steps, args.steps, "mean"

  def build(tmp):
    trainer = build_trainer(args, tmp, rows, steps)
    if data is None:
      check_batch(next(iter(trainer.get_train_dataloader())), args)
    else:
      check_tokens(trainer, data["tokens"])
    return trainer

  with tempfile.TemporaryDirectory(prefix="trl_bench_") as tmp:
    if args.trl_timing in ("both", "loop"):
      trainer = build(tmp)
      loader = trainer.get_train_dataloader()
      batches = ([next(iter(loader))] * steps if data is None
                 else list(loader) + list(loader))   # two epochs of the rows
      out["loop"] = time_trl_loop(trainer, batches, skip, stat)
      out["gradient_checkpointing_active"] = bool(trainer.model.is_gradient_checkpointing)
      log(f"TRL loop:    {out['loop']['step_s'] * 1e3:.1f} ms/step ({stat})")
      del trainer
    if args.trl_timing in ("both", "trainer"):
      trainer = build(tmp)
      out["trainer"] = time_trl_trainer(trainer, skip, stat)
      log(f"TRL trainer: {out['trainer']['step_s'] * 1e3:.1f} ms/step ({stat})")
      del trainer
  best = min((out[k]["step_s"], k) for k in ("loop", "trainer") if k in out)
  out["step_s"], out["timing"] = best
  out["pairs_per_s"] = args.batch / out["step_s"]
  return out


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


HUGETLB = "glibc.malloc.hugetlb=1"


def with_process_malloc(args, argv):
  """Re-executes this script with the glibc tunable and/or the preloaded allocator that the
  flags ask for: both are read at process start only."""
  env = dict(os.environ)
  tunables = env.get("GLIBC_TUNABLES", "")
  if args.malloc_hugetlb == "on" and HUGETLB not in tunables.split(":"):
    env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, HUGETLB) if t)
  preload = env.get("LD_PRELOAD", "")
  if args.preload and args.preload not in preload.split(":"):
    env["LD_PRELOAD"] = ":".join(t for t in (preload, args.preload) if t)
  if env == os.environ:
    return
  argv = sys.argv[1:] if argv is None else list(argv)
  log(f"re-running with GLIBC_TUNABLES={env.get('GLIBC_TUNABLES', '')!r} "
      f"LD_PRELOAD={env.get('LD_PRELOAD', '')!r}")
  sys.stdout.flush()
  os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)


def same_malloc(args) -> str:
  """Gives this process (TRL) the malloc settings that dpo_jax's process gets; before torch is
  imported, whose threads would otherwise take malloc arenas of their own."""
  os.environ["DPO_JAX_CPU_MALLOC"] = args.cpu_malloc   # read when dpo_jax is imported
  sys.path.insert(0, REPO)
  from dpo_jax import hostmem   # noqa: PLC0415
  return hostmem.use_heap()


def main_realistic(args, trl_malloc: str):
  """--lengths realistic: dpo_jax in each layout and TRL on the same variable-length pairs."""
  results = {name: [] for name in LAYOUTS}
  results["TRL"] = []
  with tempfile.TemporaryDirectory(prefix="side_by_side_") as tmp:
    if args.data_dir:
      os.makedirs(args.data_dir, exist_ok=True)
    data = realistic_data(args, args.data_dir or tmp)
    log(f"pairs: {data['jsonl']}, tokenizer: {data['tokenizer']}")
    for r in range(args.rounds):
      for name in LAYOUTS if not args.skip_jax else ():
        log(f"round {r + 1}/{args.rounds}: dpo_jax {name} (load {os.getloadavg()[0]:.2f})")
        results[name].append(run_dpo_jax_on(args, data, name))
        log(f"dpo_jax {name}: {results[name][-1]['step_s'] * 1e3:.1f} ms/step (mean)")
      if not args.skip_trl:
        log(f"round {r + 1}/{args.rounds}: TRL (load {os.getloadavg()[0]:.2f})")
        results["TRL"].append(run_trl(args, data))
  best = {k: min(v, key=lambda x: x["step_s"]) for k, v in results.items() if v}
  seq_tokens = data["sequence_tokens"] / data["pairs"]
  print(f"\nLlama d={args.hidden} L={args.layers} H={args.heads}/{args.kv_heads} "
        f"F={args.intermediate} V={args.vocab}, {data['pairs']} pairs of chat-like lengths "
        f"up to {args.seq} tokens ({seq_tokens / 2:.1f} per sequence on average, prompt "
        f"{data['tokens'][0] / data['pairs']:.1f}), {args.batch} pairs per step, f32, "
        f"{args.threads} threads, remat/grad-ckpt {args.remat}, dpo_jax attention_chunk "
        f"{args.attention_chunk}; DPO_JAX_CPU_MALLOC: TRL {trl_malloc}, LD_PRELOAD="
        f"{os.environ.get('LD_PRELOAD', '')!r}")
  print("mean step over the timed epoch (the same pairs on both sides), best of "
        f"{args.rounds} round(s)")
  print(f"{'':28s}{'pairs/s':>9s}{'step ms':>9s}{'slots/step':>11s}{'padding':>9s}"
        f"{'MFU':>7s}{'shapes':>7s}")
  for name in LAYOUTS:
    if name in best:
      x = best[name]
      print(f"{'dpo_jax ' + name:28s}{x['pairs_per_s']:9.2f}{x['step_s'] * 1e3:9.1f}"
            f"{x['tokens_computed_per_step']:11.0f}{x['data']['pad_fraction'] * 100:8.1f}%"
            f"{x['mfu'] * 100:6.1f}%{x['programs_compiled']:7d}")
  tr = best.get("TRL")
  if tr:
    for k in ("trainer", "loop"):
      if k in tr:
        extra = (f"{tr['loop']['slots_per_step']:11.0f}{tr['loop']['pad_fraction'] * 100:8.1f}%"
                 if k == "loop" else "")
        print(f"{'TRL DPOTrainer ' + k:28s}{args.batch / tr[k]['step_s']:9.2f}"
              f"{tr[k]['step_s'] * 1e3:9.1f}{extra}")
    for name in LAYOUTS:
      if name in best:
        print(f"ratio dpo_jax {name} / TRL ({tr['timing']}): "
              f"{best[name]['pairs_per_s'] / tr['pairs_per_s']:.2f}x")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "lengths": "realistic", "results": results,
                 "data": {k: v for k, v in data.items() if k != "trl_rows"}}, f, indent=1)
  return best


def main(argv=None):
  args = parse_args(argv)
  with_process_malloc(args, argv)
  trl_malloc = same_malloc(args)
  if args.lengths == "realistic":
    return main_realistic(args, trl_malloc)
  load0 = os.getloadavg()
  variants = {"both": (False, True), "off": (False,), "only": (True,)}[args.share_prompt]
  jax_rows, shared_rows, trl_rows = [], [], []
  for r in range(args.rounds):
    for shared in variants if not args.skip_jax else ():
      name = "dpo_jax shared prompt" if shared else "dpo_jax"
      log(f"round {r + 1}/{args.rounds}: {name} (load average {os.getloadavg()[0]:.2f})")
      rows = shared_rows if shared else jax_rows
      rows.append(run_dpo_jax(args, share_prompt=shared))
      log(f"{name}: {rows[-1]['step_s'] * 1e3:.1f} ms/step")
    if not args.skip_trl:
      log(f"round {r + 1}/{args.rounds}: TRL (load average {os.getloadavg()[0]:.2f})")
      trl_rows.append(run_trl(args))
  load1 = os.getloadavg()
  jx = min(jax_rows, key=lambda x: x["step_s"]) if jax_rows else None
  js = min(shared_rows, key=lambda x: x["step_s"]) if shared_rows else None
  tr = min(trl_rows, key=lambda x: x["step_s"]) if trl_rows else None

  shape = (f"Llama d={args.hidden} L={args.layers} H={args.heads}/{args.kv_heads} "
           f"F={args.intermediate} V={args.vocab}, {args.batch} pairs x {args.seq} tokens "
           f"(prompt {args.prompt_len}), f32, {args.threads} threads, remat/grad-ckpt "
           f"{args.remat}, dpo_jax attention_chunk {args.attention_chunk}")
  print(f"\n{shape}")
  print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, "
        f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r} (both sides); "
        f"DPO_JAX_CPU_MALLOC: dpo_jax "
        f"{','.join(sorted({r.get('cpu_malloc', '?') for r in jax_rows + shared_rows})) or '-'}, "
        f"TRL {trl_malloc}; dpo_jax minor page faults per step: "
        + ", ".join(f"{r['minor_faults_per_step']:.0f}" for r in jax_rows + shared_rows
                    if r.get("minor_faults_per_step") is not None)
        + "; peak resident MiB: "
        + ", ".join(f"{r['host_rss_peak_bytes'] / 2**20:.0f}" for r in jax_rows + shared_rows
                    if r.get("host_rss_peak_bytes") is not None))
  print(f"load average: {load0[0]:.2f} at start, {load1[0]:.2f} at end "
        f"(1-min; {os.cpu_count()} CPUs)")
  print(f"{'':22s}{'pairs/s':>10s}{'step ms':>10s}{'tokens/s':>11s}")
  if jx:
    print(f"{'dpo_jax':22s}{jx['pairs_per_s']:10.3f}{jx['step_s'] * 1e3:10.1f}"
          f"{jx['tokens_per_s']:11.0f}")
  if js:
    print(f"{'dpo_jax shared prompt':22s}{js['pairs_per_s']:10.3f}{js['step_s'] * 1e3:10.1f}"
          f"{js['tokens_per_s']:11.0f}")
  if tr:
    for k in ("trainer", "loop"):
      if k in tr:
        print(f"{'TRL DPOTrainer ' + k:22s}{args.batch / tr[k]['step_s']:10.3f}"
              f"{tr[k]['step_s'] * 1e3:10.1f}"
              f"{2 * args.batch * args.seq / tr[k]['step_s']:11.0f}")
  if jx and tr:
    print(f"ratio dpo_jax / TRL ({tr['timing']}, TRL's faster timing): "
          f"{jx['pairs_per_s'] / tr['pairs_per_s']:.2f}x")
  if js and tr:
    print(f"ratio dpo_jax shared prompt / TRL: {js['pairs_per_s'] / tr['pairs_per_s']:.2f}x "
          f"(the same pairs; {js['tokens_computed_per_step']} tokens computed per step instead "
          f"of {js['tokens_per_step']})")
  if jx:
    print(f"dpo_jax MFU: {jx['mfu'] * 100:.1f}% of the measured f32 matmul peak "
          f"{jx['peak_flops'] / 1e9:.1f} GFLOP/s ({jx['flops_per_step'] / 1e9:.2f} GFLOP/step, "
          f"{jx['achieved_flops'] / 1e9:.1f} GFLOP/s achieved)")
    if tr:   # TRL computes logits at every position: add the unembedding dpo_jax skips
      unembed = (8 if jx["reference_forward"] else 6) * args.hidden * args.vocab
      trl_flops = jx["flops_per_step"] + unembed * jx["rows"] * (jx["row_length"]
                                                                 - jx["scored_per_row"])
      print(f"TRL: {trl_flops / 1e9:.2f} GFLOP/step (logits at every position), "
            f"{trl_flops / tr['step_s'] / jx['peak_flops'] * 100:.1f}% of that peak")
  if js:
    print(f"dpo_jax shared prompt MFU: {js['mfu'] * 100:.1f}% ({js['flops_per_step'] / 1e9:.2f} "
          f"GFLOP/step computed, {js['achieved_flops'] / 1e9:.1f} GFLOP/s achieved)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "dpo_jax": jax_rows, "dpo_jax_shared": shared_rows,
                 "trl": trl_rows, "trl_cpu_malloc": trl_malloc,
                 "loadavg": [load0, load1]}, f, indent=1)
  return jx, tr, js


if __name__ == "__main__":
  main()
