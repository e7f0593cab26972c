"""The trainer: one jit-compiled preference step, and the loop around it.

The step is a pure function of plain pytrees:

    state, metrics = train_step(state, frozen, batch)

state = {step, params, opt_state, loss_state, rng, skipped}; frozen = {"ref": reference params,
"teacher": teacher params} (either None when unused); batch leaves have a leading micro-batch
axis [k, ...] (k = config.grad_accum), each micro-batch holding 2b rows [chosen; rejected].
Policy forward+backward and the reference (and teacher) forwards under stop_gradient run in
the same program.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dpo_jax import checkpoint, distributed, losses, reference, sharding, teacher, writers
from dpo_jax.data import packing, preference
from dpo_jax.models import core, load, logprobs
from dpo_jax.models.config import ModelConfig

Array = jax.Array

# =============================================================================================
# Optimizer
# =============================================================================================


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int):
  """AdamW with linear warmup + cosine decay and global-norm clipping (TRL/HF defaults)."""
  warmup = int(round(optim.warmup_ratio * total_steps))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=optim.lr * optim.final_lr_ratio)
  tx = optax.chain(
      optax.clip_by_global_norm(optim.clip) if optim.clip else optax.identity(),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay))
  return tx, schedule


# =============================================================================================
# The step
# =============================================================================================


@dataclasses.dataclass(frozen=True)
class StepFns:
  train_step: Callable      # (state, frozen, batch) -> (state, metrics)
  eval_step: Callable       # (params, loss_state, frozen, batch) -> metric sums
  example_metrics: Callable  # (params, loss_state, frozen, batch) -> {name: [b]}


# What a loss's `token_stats` asks for: the model statistic computed on each side.
POLICY_STATS = {"logsumsq": "logsumsq"}   # WPO: per-token log Σ_v p_v² of the policy
REF_STATS = {"ref_entropy": "entropy"}     # Mallows: the reference's next-token entropy


def side_stats(spec: losses.LossSpec, table: dict) -> tuple[str, ...]:
  return tuple(sorted({table[s] for s in spec.token_stats if s in table}))


def pair_logps(spec: losses.LossSpec, pol: dict, ref: dict | None, batch: dict,
               vocab_size: int, teacher: dict | None = None) -> losses.PairLogps:
  """Splits the 2b per-sequence values into chosen (first half) and rejected (second half)."""
  b = batch["valid"].shape[0]
  first, second = (lambda x: x[:b]), (lambda x: x[b:])
  extra = {}
  if "logsumsq" in spec.token_stats:
    extra["policy_chosen_logsumsq"] = first(pol["tokens/logsumsq"])
    extra["policy_rejected_logsumsq"] = second(pol["tokens/logsumsq"])
  if "ref_entropy" in spec.token_stats:   # mean over both completions, normalised by log V
    ent, n = ref["entropy"], pol["lens"]
    extra["ref_entropy"] = ((first(ent) + second(ent)) / jnp.maximum(first(n) + second(n), 1)
                            / jnp.log(vocab_size))
  if teacher is not None and "logps" in teacher:   # daDPO, sequence level
    extra["teacher_chosen"] = first(teacher["logps"])
    extra["teacher_rejected"] = second(teacher["logps"])
  if "teacher_kl" in pol:   # daDPO, token level: Σ over completion tokens of KL(π_te ‖ π_θ)
    extra["teacher_kl_chosen"] = first(pol["teacher_kl"])
    extra["teacher_kl_rejected"] = second(pol["teacher_kl"])
  tok = lambda src, half: None if src is None or "tokens/logp" not in src else half(
      src["tokens/logp"])
  return losses.PairLogps(
      policy_chosen=first(pol["logps"]), policy_rejected=second(pol["logps"]),
      ref_chosen=None if ref is None else first(ref["logps"]),
      ref_rejected=None if ref is None else second(ref["logps"]),
      chosen_len=first(pol["lens"]), rejected_len=second(pol["lens"]), label=batch["label"],
      policy_chosen_tokens=tok(pol, first), policy_rejected_tokens=tok(pol, second),
      ref_chosen_tokens=tok(ref, first), ref_rejected_tokens=tok(ref, second),
      extra=extra or None, valid=batch["valid"])


def make_step(graphdef, spec: losses.LossSpec, hparams: dict, tx, schedule,
              ref_logps_fn: Callable, *, chunk: int,
              teacher_fn: Callable = lambda params, batch: None) -> StepFns:
  """Builds the pure train and eval steps for one loss, one reference mode and one teacher."""
  stats = side_stats(spec, POLICY_STATS)

  def forward(params, loss_state, frozen, batch):
    model = core.merge(graphdef, params)
    te = teacher_fn(frozen["teacher"], batch)
    pol = logprobs.sequence_logps(model, batch, chunk=chunk, stats=stats,
                                  tokens=spec.needs_tokens, teacher=teacher.kl_teacher(te))
    ref = ref_logps_fn(frozen["ref"], batch)
    logps = pair_logps(spec, pol, ref, batch, model.cfg.vocab_size, te)
    loss_b, metrics = spec(logps, **hparams, **loss_state)
    return pol, loss_b, metrics

  def micro_loss(params, loss_state, frozen, batch):
    """Σ over valid pairs of the per-example loss, and metric (numerator, denominator) pairs."""
    pol, loss_b, metrics = forward(params, loss_state, frozen, batch)
    w = batch["valid"]
    b = w.shape[0]
    n = jnp.sum(w)
    sums = {k: ((jnp.sum(v * w), n) if jnp.ndim(v) == 1 else (v, jnp.ones(())))
            for k, v in metrics.items()}
    sums["logps/chosen"] = (jnp.sum(pol["logps"][:b] * w), n)
    sums["logps/rejected"] = (jnp.sum(pol["logps"][b:] * w), n)
    # TRL: mean logit over completion tokens (and vocab) of the whole batch.
    sums["logits/chosen"] = (jnp.sum(pol["logit_sum"][:b] * w), jnp.sum(pol["lens"][:b] * w))
    sums["logits/rejected"] = (jnp.sum(pol["logit_sum"][b:] * w), jnp.sum(pol["lens"][b:] * w))
    sums = jax.tree.map(lambda x: jax.lax.stop_gradient(x).astype(jnp.float32), sums)
    return jnp.sum(loss_b * w), sums

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def accumulate(fn, batch):
    """Sums fn(micro-batch) over the leading micro-batch axis with a scan."""
    first = jax.tree.map(lambda x: x[0], batch)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first))

    def body(acc, mb):
      return jax.tree.map(jnp.add, acc, fn(mb)), None
    return jax.lax.scan(body, zeros, batch)[0]

  def finish(loss_sum, sums, n_valid):
    metrics = {k: num / jnp.maximum(den, 1e-9) for k, (num, den) in sums.items()}
    metrics["loss"] = loss_sum / n_valid
    return metrics

  def train_step(state, frozen, batch):
    n_valid = jnp.sum(batch["valid"])
    (loss_sum, sums), grads = accumulate(
        lambda mb: grad_fn(state["params"], state["loss_state"], frozen, mb), batch)
    # Exact accumulation: every micro-batch contributed a SUM; divide once by the pair count.
    grads = jax.tree.map(lambda g: g / n_valid, grads)
    metrics = finish(loss_sum, sums, n_valid)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["learning_rate"] = schedule(state["step"])
    # A non-finite loss or gradient leaves params, optimizer and loss state as they were (a
    # select, not a branch); the loop then stops or counts the step (config.nonfinite).
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    new_state = {
        "step": state["step"] + 1,
        "params": keep(optax.apply_updates(state["params"], updates), state["params"]),
        "opt_state": keep(opt_state, state["opt_state"]),
        "loss_state": keep(spec.update_state(state["loss_state"], metrics),
                           state["loss_state"]),
        "rng": state["rng"],
        "skipped": state["skipped"] + 1 - finite.astype(jnp.int32),
    }
    metrics["skipped_steps"] = new_state["skipped"].astype(jnp.float32)
    return new_state, metrics

  def eval_step(params, loss_state, frozen, batch):
    return accumulate(lambda mb: micro_loss(params, loss_state, frozen, mb), batch)

  def example_metrics(params, loss_state, frozen, batch):
    """Per-example loss and metrics ([b] each) of one micro-batch, e.g. λ per pair."""
    _, loss_b, metrics = forward(params, loss_state, frozen, batch)
    return {"loss": loss_b, **{k: v for k, v in metrics.items() if jnp.ndim(v) == 1}}

  return StepFns(train_step, eval_step, example_metrics)


def microbatches(batch: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
  """[2B, ...] rows and [B] examples -> [k, 2B/k, ...] and [k, B/k], keeping pairs together."""
  b = batch["valid"].shape[0]
  if b % k:
    raise ValueError(f"config.batch_size={b} is not divisible by config.grad_accum={k}")
  out = {}
  for name, x in batch.items():
    if name == "seq_index":   # sequence s = (half h, pair i) -> (h, i mod b/k) in its micro-batch
      x = (x // b) * (b // k) + (x % b) % (b // k)
    if x.shape[0] == 2 * b:   # [chosen; rejected] rows
      x = x.reshape(2, k, b // k, *x.shape[1:]).swapaxes(0, 1).reshape(k, 2 * b // k,
                                                                        *x.shape[1:])
    else:
      x = x.reshape(k, b // k, *x.shape[1:])
    out[name] = x
  return out


def batch_signature(batch: dict[str, np.ndarray]) -> tuple:
  """What the jitted step compiles a program for: every array's name, shape and dtype. Not the
  tokens' shape alone: packed rows of one shape can score a different number of positions
  (score_index, data.score_parts), which is another program."""
  return tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))


def train_batch(data, step: int, k: int) -> dict[str, np.ndarray]:
  """Batch `step` with a leading micro-batch axis; packed data is packed per micro-batch."""
  if isinstance(data, packing.PackedBatches):
    return data.microbatches(step, k)
  return microbatches(data(step), k)


# =============================================================================================
# Setup: config -> model, data, reference, state, shardings
# =============================================================================================


@dataclasses.dataclass
class Run:
  """Everything the loop needs, built once from the config."""
  config: ml_collections.ConfigDict
  mesh: Any
  rules: Any
  model_cfg: ModelConfig
  tokenizer: Any
  spec: losses.LossSpec
  train_data: preference.Batches
  eval_examples: Sequence
  eval_columns: dict
  state: dict
  state_shardings: Any
  reference: reference.Reference
  ref_params: Any
  teacher: teacher.Teacher
  fns: StepFns
  batch_sharding: Callable
  steps: int   # config.steps, or config.epochs worth of batches when epochs > 0

  @property
  def frozen(self) -> dict:
    """The step's frozen models: {"ref": reference params, "teacher": teacher params}."""
    return {"ref": self.ref_params, "teacher": self.teacher.params}

  def jit_train_step(self):
    """The step with fixed state shardings in and out (so it compiles once per batch shape)
    and the state donated."""
    return jax.jit(self.fns.train_step, in_shardings=(self.state_shardings, None, None),
                   out_shardings=(self.state_shardings, None), donate_argnums=0)


def loss_hparams(loss_cfg: ml_collections.ConfigDict, spec: losses.LossSpec) -> dict:
  given = {k: v for k, v in loss_cfg.items() if k != "name"}
  known = spec.hparams
  unknown = sorted(set(given) - set(known))
  if unknown:
    raise ValueError(f"config.loss.{unknown[0]} is not a hyperparameter of loss "
                     f"{spec.name!r}; it takes {sorted(known)}")
  return {**known, **given}


def scratch_model(model_cfg: ml_collections.ConfigDict) -> ModelConfig:
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  return ModelConfig(**{k: v for k, v in model_cfg.items() if k in fields})


def load_data(config, tokenizer, pad_id: int, workdir: str | None = None):
  opts = preference.TokenizeOptions(config.data.max_length, config.data.max_prompt_length,
                                    config.data.truncation_mode)
  # W/data_cache: a rerun of the same job (a resume) reads the examples instead of tokenising.
  cache = os.path.join(workdir, "data_cache") if workdir and config.data.cache else None
  keep = config.data.cache_keep
  if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
    raise ValueError(f"config.data.cache_keep={keep!r} must be an integer >= 0 (0: keep every "
                     f"file of W/data_cache)")
  streaming = config.data.streaming   # a bool: ml_collections refuses another type
  source, rows = preference.load_rows(config.data.train, config.data.split, streaming)
  split = distributed.tokenize_split()   # several processes: each tokenises 1/n of the rows
  examples, skipped = preference.tokenize_cached(cache, rows, tokenizer, opts, source,
                                                 config.data.on_error, **split, keep=keep)
  if config.data.eval:
    esource, erows = preference.load_rows(config.data.eval, config.data.eval_split, streaming)
    eval_examples, eskipped = preference.tokenize_cached(cache, erows, tokenizer, opts, esource,
                                                         config.data.on_error, **split, keep=keep)
    skipped += eskipped
  else:   # hold out a deterministic fraction of the training rows
    n_eval = int(len(examples) * config.data.eval_fraction)
    order = np.random.default_rng(config.seed).permutation(len(examples))
    eval_examples = examples.take(order[:n_eval])
    examples = examples.take(np.sort(order[n_eval:]))
  buckets = tuple(config.data.buckets) or preference.default_buckets(config.data.max_length)
  share = config.data.share_prompt
  parts = config.data.score_parts
  if not isinstance(parts, int) or isinstance(parts, bool) or parts < 0:
    raise ValueError(f"config.data.score_parts={parts!r} must be an integer >= 0 (0: score "
                     f"every position)")
  if config.data.packing or share:   # several sequences per row (data/packing.py)
    train = packing.PackedBatches(
        examples, config.batch_size, config.seed, buckets, pad_id,
        row_length=config.data.row_length or max(buckets) * (2 if share else 1),
        row_buckets=tuple(config.data.row_buckets) or None, share_prompt=share,
        score_parts=parts)
  else:
    train = preference.Batches(examples, config.batch_size, config.seed, buckets, pad_id,
                               score_parts=parts)
  return train, eval_examples, skipped


def setup(config: ml_collections.ConfigDict, devices=None, workdir: str | None = None) -> Run:
  if config.nonfinite not in ("stop", "skip"):
    raise ValueError(f"config.nonfinite must be 'stop' or 'skip', got {config.nonfinite!r}")
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
  rules = sharding.rules_from_config(config.mesh.rules.to_dict())
  spec = losses.get(config.loss.name)
  hparams = loss_hparams(config.loss, spec)
  numerics = {k: config.model[k] for k in load.NUMERICS}
  model_cfg = load.model_config(config.model.init, scratch_model(config.model), **numerics)
  tokenizer = load.load_tokenizer(config.model.tokenizer or config.model.init)
  pad_id = preference.pad_id(tokenizer)
  train_data, eval_examples, _ = load_data(config, tokenizer, pad_id, workdir)

  n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
  if isinstance(train_data, packing.PackedBatches):
    train_data.row_multiple = n_batch   # packed rows shard evenly over data×fsdp
  micro = config.batch_size // max(config.grad_accum, 1)
  if micro % n_batch:
    raise ValueError(f"config.batch_size={config.batch_size} / config.grad_accum="
                     f"{config.grad_accum} = {micro} pairs per micro-batch is not divisible by "
                     f"the {n_batch} data×fsdp devices of config.mesh")

  params = load.load_params(config.model.init, model_cfg, mesh, rules, config.seed)
  ref = reference.build(
      config.reference.mode, config.reference, spec, model_cfg, params, mesh, rules,
      chunk=config.logprob_chunk, stats=side_stats(spec, REF_STATS), tokens=spec.needs_tokens,
      workdir=workdir, batch_size=config.eval_batch_size or config.batch_size,
      buckets=train_data.buckets, pad_id=pad_id)
  te = teacher.build(config.teacher, spec, model_cfg, mesh, rules, chunk=config.logprob_chunk,
                     workdir=workdir, batch_size=config.eval_batch_size or config.batch_size,
                     buckets=train_data.buckets, pad_id=pad_id)
  train_data.columns = {**ref.columns(train_data.examples, "train"),
                        **te.columns(train_data.examples, "train")}
  eval_columns = ({**ref.columns(eval_examples, "eval"), **te.columns(eval_examples, "eval")}
                  if eval_examples else {})
  steps = total_steps(config, len(train_data.examples))
  tx, schedule = make_optimizer(config.optim, steps)
  graphdef = core.split(model_cfg)[0]
  fns = make_step(graphdef, spec, hparams, tx, schedule, ref.logps_fn,
                  chunk=config.logprob_chunk, teacher_fn=te.fn)

  rep = sharding.replicated(mesh)
  opt_state = jax.jit(tx.init)(params)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state,
           "loss_state": jax.tree.map(jnp.asarray, spec.init_state()),
           "rng": jax.random.key_data(jax.random.key(config.seed)),
           "skipped": jnp.zeros((), jnp.int32)}
  # Optimizer moments inherit their param's sharding; scalars (counts, step) are replicated.
  on_mesh = lambda x: (x.sharding if isinstance(getattr(x, "sharding", None),
                                                jax.sharding.NamedSharding)
                       and x.sharding.mesh == mesh else rep)
  state = jax.device_put(state, jax.tree.map(on_mesh, state))
  state_shardings = jax.tree.map(lambda x: x.sharding, state)

  def batch_sharding(x):
    spec_ = sharding.logical_to_spec((None, "batch") + (None,) * (x.ndim - 2), x.shape, mesh,
                                     rules)
    return jax.sharding.NamedSharding(mesh, spec_)

  return Run(config, mesh, rules, model_cfg, tokenizer, spec, train_data, eval_examples,
             eval_columns, state, state_shardings, ref, ref.params, te, fns, batch_sharding,
             steps)


def total_steps(config: ml_collections.ConfigDict, n_train: int) -> int:
  """config.epochs > 0 (the papers' "1 epoch") wins over config.steps."""
  if config.get("epochs", 0) > 0:
    return max(1, math.ceil(config.epochs * n_train / config.batch_size))
  if config.steps < 1:
    raise ValueError(f"config.steps={config.steps} must be >= 1 (or set config.epochs)")
  return config.steps


def to_device(batch: dict[str, np.ndarray], run: Run) -> dict[str, Array]:
  return {k: sharding.host_local_array(v, run.batch_sharding(v)) for k, v in batch.items()}


# =============================================================================================
# Evaluation on held-out pairs
# =============================================================================================


def evaluate(run: Run, eval_jit, state) -> dict:
  if not run.eval_examples:
    return {}
  bs = run.config.eval_batch_size or run.config.batch_size
  totals = None
  for batch in preference.eval_batches(run.eval_examples, bs, run.train_data.buckets,
                                       run.train_data.pad_id, run.eval_columns,
                                       run.train_data.score_parts):
    out = eval_jit(state["params"], state["loss_state"], run.frozen,
                   to_device(microbatches(batch, 1), run))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  loss_sum, sums = jax.device_get(totals)
  n = len(run.eval_examples)
  metrics = {k: float(num) / max(float(den), 1e-9) for k, (num, den) in sums.items()}
  metrics["loss"] = float(loss_sum) / n
  return {f"eval/{k}": v for k, v in metrics.items()}


# =============================================================================================
# The loop
# =============================================================================================


def checkpoint_meta(run: Run, step: int) -> dict:
  return {"model": run.model_cfg.to_hf_dict(),
          "model_numerics": load.numerics(run.model_cfg),
          "step": step, "epoch": run.train_data.epoch(step),
          "config": run.config.to_json_best_effort()}


def log_pair_metrics(run: Run, state: dict, path: str, n: int):
  """Per-pair loss metrics of the first n training examples (e.g. the gradient weight λ) with
  the current policy and reference, saved to `path` (.npz). At step 0 this shows how the
  reference weighs each pair before training: λ = ½ for every pair when ref = policy, and
  σ(β(m_guide − m_init))-like spreads with a guiding reference (Pre-DPO)."""
  from dpo_jax import evaluate   # noqa: PLC0415
  n = min(n, len(run.train_data.examples))
  fn = jax.jit(lambda p, ls, rp, b: run.fns.example_metrics(p, ls, rp, b))
  cols = {k: v[:n] for k, v in run.train_data.columns.items()}
  out = evaluate.map_batches(
      lambda b: fn(state["params"], state["loss_state"], run.frozen, b),
      run.train_data.examples[:n], mesh=run.mesh, rules=run.rules,
      batch_size=run.config.eval_batch_size or run.config.batch_size,
      buckets=run.train_data.buckets, pad_id=run.train_data.pad_id, columns=cols,
      per_example=True)
  if jax.process_index() == 0:
    np.savez(path, **{k.replace("/", "_"): v for k, v in out.items()})
  return out


def save_state(mgr, run: Run, state: dict, step: int):
  checkpoint.save(mgr, step, state["params"], {k: v for k, v in state.items() if k != "params"},
                  checkpoint_meta(run, step), ref=run.ref_params if run.reference.saved else None)


def restore_state(mgr, run: Run, step: int) -> dict:
  """Restores the train state (and a TR-DPO reference into `run`) resharded onto run.mesh."""
  sh = run.state_shardings
  abstract = checkpoint.abstract_like(run.state, sh)
  abstract_ref = None
  if run.reference.saved:
    abstract_ref = checkpoint.abstract_like(
        run.ref_params, jax.tree.map(lambda x: x.sharding, run.ref_params))
  params, train, _, ref = checkpoint.restore(
      mgr, step, abstract["params"], {k: v for k, v in abstract.items() if k != "params"},
      abstract_ref)
  if ref is not None:
    run.ref_params = ref
  return {**train, "params": params}


def every(step: int, period: int) -> bool:
  """True every `period` steps; a period of 0 means never (only the last step logs/saves)."""
  return bool(period) and step % period == 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
  """Trains (or resumes) in `workdir`; returns the last logged metrics."""
  from tqdm import tqdm   # noqa: PLC0415
  run = setup(config, devices, workdir)
  os.makedirs(workdir, exist_ok=True)
  writers.save_tokenizer(run.tokenizer, os.path.join(workdir, "tokenizer"))
  mgr = checkpoint.manager(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
  state = run.state
  start = mgr.latest_step() or 0
  if start:   # initialisation precedence: resume workdir > init_from > scratch
    state = restore_state(mgr, run, start)
  elif config.log_pair_metrics:
    log_pair_metrics(run, state, os.path.join(workdir, "pairs_start.npz"),
                     config.log_pair_metrics)

  step_jit = run.jit_train_step()
  eval_jit = jax.jit(run.fns.eval_step)
  writer = writers.MetricsWriter(workdir, start, enabled=jax.process_index() == 0)
  last = {}
  bar = tqdm(range(start, run.steps), initial=start, total=run.steps, desc="dpo",
             disable=not config.progress or jax.process_index() != 0)
  # Steady-state step time: synced intervals between log points that compiled, evaluated and
  # checkpointed nothing (the device_get of the metrics is the sync).
  step_times, compiled_for = [], set()
  t_mark, n_since, clean = time.perf_counter(), 0, False
  preempt, pending = PreemptionFlag(), None
  try:
    for step in bar:
      batch_np = train_batch(run.train_data, step, config.grad_accum)
      if (sig := batch_signature(batch_np)) not in compiled_for:   # this interval compiles
        compiled_for.add(sig)
        clean = False
      state, metrics = step_jit(state, run.frozen, to_device(batch_np, run))
      done, n_since = step + 1, n_since + 1
      # The NaN/Inf check reads the PREVIOUS step's flag while this one runs (no stall), and
      # this step's before anything is logged or saved.
      if pending is not None:
        check_finite(pending, done - 1, config.nonfinite, mgr)
      if run.reference.update is not None and done % run.reference.every == 0:   # TR-DPO
        run.ref_params = run.reference.update(run.ref_params, state["params"])
      is_last = done == run.steps
      stop = preempt.is_set(done)
      logs = every(done, config.log_every) or is_last
      if logs or stop or every(done, config.ckpt_every):
        check_finite(metrics, done, config.nonfinite, mgr)
        pending = None
      else:
        pending = metrics
      if logs:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if clean:
          step_times.append((time.perf_counter() - t_mark) / n_since)
        metrics["epoch"] = run.train_data.epoch(done)
        if config.eval_every and (done % config.eval_every == 0 or is_last):
          metrics.update(evaluate(run, eval_jit, state))
        timing = {"perf/step_s": float(np.median(step_times))} if step_times else {}
        writer.write(done, metrics, timing)
        last = {**metrics, **timing}
        bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                        acc=f"{metrics.get('rewards/accuracies', float('nan')):.2f}")
      if every(done, config.ckpt_every) or is_last or stop:
        save_state(mgr, run, state, done)
      if stop:
        raise Preempted(f"stopped by {preempt.signal_name} after step {done}; checkpoint saved "
                        f"in {mgr.directory}; re-run the same command to resume")
      if every(done, config.log_every):
        jax.block_until_ready(state["step"])
        t_mark, n_since, clean = time.perf_counter(), 0, True
  finally:
    preempt.restore()
    writer.close()
    mgr.close()
  return last


class Preempted(Exception):
  """Training stopped on SIGTERM/SIGINT after saving a checkpoint; the same command resumes."""


class PreemptionFlag:
  """Turns SIGTERM (TPU preemption, scheduler kill) and SIGINT into a stop after a step. One
  process stops after the step it was signalled in; several agree on a step a little later
  (distributed.StopAgreement), so every host saves the same step."""
  _runs = itertools.count()   # one key namespace per training run in this process

  def __init__(self, signals=("SIGTERM", "SIGINT")):
    import signal   # noqa: PLC0415
    import threading   # noqa: PLC0415
    self._set, self.signal_name, self._old = False, None, {}
    self._agreement = None
    if jax.process_count() > 1:
      self._agreement = distributed.StopAgreement(
          distributed.kv_client(), jax.process_index(), jax.process_count(),
          f"dpo_jax/preempt/{next(PreemptionFlag._runs)}")
    if threading.current_thread() is not threading.main_thread():
      return   # signal handlers can only be installed from the main thread
    for name in signals:
      sig = getattr(signal, name)
      self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    import signal   # noqa: PLC0415
    del frame
    self._set, self.signal_name = True, signal.Signals(signum).name

  def is_set(self, step: int) -> bool:
    if self._agreement is None:
      return self._set
    own = f"{self.signal_name} on process {jax.process_index()}" if self._set else None
    stop = self._agreement.should_stop(step, own)
    if stop and not self._set:
      self.signal_name = self._agreement.notice
    return stop

  def restore(self):
    import signal   # noqa: PLC0415
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}


def check_finite(metrics: dict, step: int, policy: str, mgr):
  """config.nonfinite: 'stop' raises at the first step whose loss or gradient norm is NaN/Inf
  (the step itself changed nothing, and no checkpoint is written after it); 'skip' goes on.
  It reads the flag under either policy: the loop calls it for step s - 1 after dispatching s,
  which keeps the host one step ahead of the devices and no further (StopAgreement needs that)."""
  if not float(metrics["nonfinite"]) or policy == "skip":
    return
  bad = {k: float(metrics[k]) for k in ("loss", "grad_norm")
         if not np.isfinite(float(metrics[k]))}
  latest = mgr.latest_step()
  raise FloatingPointError(
      f"step {step}: non-finite {', '.join(f'{k} = {v}' for k, v in bad.items())}; stopping. "
      + (f"The last good checkpoint is step {latest} in {mgr.directory}. " if latest else
         "No checkpoint was written yet. ")
      + "Set config.nonfinite='skip' to skip such steps (they are counted in skipped_steps).")


def print_summary(workdir: str, last: dict):
  rows = writers.read_metrics(workdir)
  evals = [r for r in rows if "eval/rewards/accuracies" in r]
  print(f"\nmetrics:      {os.path.join(workdir, 'metrics.jsonl')} ({len(rows)} rows)")
  print(f"tensorboard:  {os.path.join(workdir, 'tensorboard')}")
  print(f"checkpoints:  {os.path.join(workdir, 'checkpoints')}")
  if last:
    print(f"last step:    loss {last['loss']:.4f}, train accuracy "
          f"{last.get('rewards/accuracies', float('nan')):.3f}, margin "
          f"{last.get('rewards/margins', float('nan')):.3f}"
          + (f", {last['perf/step_s'] * 1e3:.1f} ms/step (median, steady state)"
             if "perf/step_s" in last else ""))
  if evals:
    first, final = evals[0], evals[-1]
    print(f"held-out:     preference accuracy {first['eval/rewards/accuracies']:.3f} (step "
          f"{first['step']}) -> {final['eval/rewards/accuracies']:.3f} (step {final['step']}), "
          f"margin {final['eval/rewards/margins']:.3f}, loss {final['eval/loss']:.4f} "
          f"(ln 2 = 0.6931 at the start)")
