"""The trainer: one jit-compiled preference step, and the loop around it.

The step is a pure function of plain pytrees:

    state, metrics = train_step(state, frozen, batch)

state = {step, params, opt_state, loss_state, rng, skipped}; frozen = {"ref": reference params,
"teacher": teacher params} (either None when unused); batch leaves have a leading micro-batch
axis [k, ...] (k = config.grad_accum), each micro-batch holding 2b rows [chosen; rejected].
Policy forward+backward and the reference (and teacher) forwards under stop_gradient run in
the same program. build.setup(config) makes everything the loop below needs (a build.Run).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dpo_jax import build, checkpoint, distributed, losses, teacher, writers
from dpo_jax.data import packing, preference
from dpo_jax.models import core, load, logprobs


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
  if "ref_entropy" in spec.token_stats:   # mean of the two completions' token means, / log V
    mean = ref["entropy"] / jnp.maximum(pol["lens"], 1)
    extra["ref_entropy"] = (first(mean) + second(mean)) / 2 / jnp.log(vocab_size)
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


def make_train_step(graphdef, spec: losses.LossSpec, hparams: dict, tx, schedule,
                    ref_logps_fn: Callable, *, chunk: int,
                    teacher_fn: Callable = lambda params, batch: None) -> StepFns:
  """Builds the pure train and eval steps for one loss, one reference mode and one teacher.

  Gradient accumulation is exact: the update of k micro-batches equals that of one batch k
  times larger. A loss of independent pairs sums each micro-batch's gradient. A batch-coupled
  loss (spec.batch_coupled: AOT's sort, KTO's z0, ...) needs the whole batch's values first: a
  forward pass computes every micro-batch's policy and reference values, then each
  micro-batch's backward pass differentiates the whole-batch loss through its own values only,
  the others held fixed. Those partial gradients sum to the whole batch's gradient.
  """
  stats = side_stats(spec, POLICY_STATS)

  def policy_values(params, frozen, batch):
    """Per-sequence policy values of one micro-batch, and the teacher's (its token-level KL
    runs inside the policy's log-prob loop)."""
    model = core.merge(graphdef, params)
    te = teacher_fn(frozen["teacher"], batch)
    pol = logprobs.sequence_logps(model, batch, chunk=chunk, stats=stats,
                                  tokens=spec.needs_tokens, teacher=teacher.kl_teacher(te))
    return pol, te, model.cfg.vocab_size

  def forward(params, loss_state, frozen, batch):
    pol, te, vocab = policy_values(params, frozen, batch)
    ref = ref_logps_fn(frozen["ref"], batch)
    loss_b, metrics = spec(pair_logps(spec, pol, ref, batch, vocab, te), **hparams, **loss_state)
    return pol, loss_b, metrics

  def summarise(pol, loss_b, metrics, w):
    """Σ over valid pairs of the per-example loss, and (pair count, metric (numerator,
    denominator) pairs). logps/* and logits/* (TRL's) are over the two halves of the rows, or
    over the groups the loss averages unpaired rows' rewards over (losses.GroupMean)."""
    def total(v, g=1.0):
      v, g = v if isinstance(v, losses.GroupMean) else (v, g)
      return (jnp.sum(v * g * w), jnp.sum(g * w)) if jnp.ndim(v) == 1 else (v, jnp.ones(()))
    b, sums = w.shape[0], {k: total(v) for k, v in metrics.items()}
    groups = [metrics.get(f"rewards/{h}") for h in ("chosen", "rejected")]
    unpaired = all(isinstance(g, losses.GroupMean) for g in groups)
    for i, half in enumerate(("chosen", "rejected")):
      rows, g = (slice(0, b), groups[i].weights) if unpaired else (slice(i * b, i * b + b), 1.0)
      sums[f"logps/{half}"] = total(pol["logps"][rows], g)
      # TRL: mean logit over completion tokens (and vocab) of the whole batch.
      sums[f"logits/{half}"] = (jnp.sum(pol["logit_sum"][rows] * g * w),
                                jnp.sum(pol["lens"][rows] * g * w))
    return jnp.sum(loss_b * w), jax.tree.map(
        lambda x: jax.lax.stop_gradient(x).astype(jnp.float32), (jnp.sum(w), sums))

  def micro_loss(params, loss_state, frozen, batch):
    pol, loss_b, metrics = forward(params, loss_state, frozen, batch)
    return summarise(pol, loss_b, metrics, batch["valid"])

  def accumulate(fn, batch):
    """Sums fn(micro-batch) over the leading micro-batch axis with a scan."""
    first = jax.tree.map(lambda x: x[0], batch)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first))

    def body(acc, mb):
      return jax.tree.map(jnp.add, acc, fn(mb)), None
    return jax.lax.scan(body, zeros, batch)[0]

  def per_micro_batch(params, loss_state, frozen, batch):
    """(loss sum, metric sums), gradient sum: each micro-batch on its own."""
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    return accumulate(lambda mb: grad_fn(params, loss_state, frozen, mb), batch)

  def whole_batch_values(params, frozen, batch):
    """Every micro-batch's policy, reference and teacher values ([k, 2b, ...]; no gradient),
    the whole batch's loss as a function of the stacked policy values, and (params, frozen,
    batch) as values computed after those (see after_loop)."""
    def values(mb):
      pol, te, _ = policy_values(params, frozen, mb)
      te_seq = None if te is None or "logps" not in te else {"logps": te["logps"]}
      return pol, ref_logps_fn(frozen["ref"], after_loop(mb, pol["logps"])), te_seq
    pols, refs, tes = jax.lax.map(values, batch)
    params, frozen, batch = after_loop((params, frozen, batch), pols["logps"])
    vocab = core.merge(graphdef, params).cfg.vocab_size
    pairs = {k: merge_pairs(batch[k]) for k in ("valid", "label")}

    def whole_loss(pol_stack, loss_state):
      logps = pair_logps(spec, merge_rows(pol_stack), merge_rows(refs), pairs, vocab,
                         merge_rows(tes))
      return spec(logps, **hparams, **loss_state)
    return pols, pairs, whole_loss, (params, frozen, batch)

  def whole_batch(params, loss_state, frozen, batch):
    """(loss sum, metric sums), gradient sum of a batch-coupled loss (see above)."""
    pols, pairs, whole_loss, (params, frozen, batch) = whole_batch_values(params, frozen, batch)
    loss_b, metrics = whole_loss(pols, loss_state)
    totals = summarise(merge_rows(pols), loss_b, metrics, pairs["valid"])

    def partial_grad(i, mb):
      def loss_through_micro_batch(p):
        pol = policy_values(p, frozen, mb)[0]
        stack = jax.tree.map(lambda s, x: s.at[i].set(x), pols, pol)
        return jnp.sum(whole_loss(stack, loss_state)[0] * pairs["valid"])
      return jax.grad(loss_through_micro_batch)(params)
    return totals, accumulate(lambda xs: partial_grad(*xs),
                              (jnp.arange(batch["valid"].shape[0]), batch))

  def gradients(params, loss_state, frozen, batch):
    """A batch-coupled loss over several micro-batches needs the whole batch's values first."""
    several = batch["valid"].shape[0] > 1
    accumulate_grads = whole_batch if spec.batch_coupled and several else per_micro_batch
    return accumulate_grads(params, loss_state, frozen, batch)

  def train_step(state, frozen, batch):
    (loss_sum, (n_valid, sums)), grads = gradients(state["params"], state["loss_state"], frozen,
                                                   batch)   # n_valid: see after_loop
    # Exact accumulation: every micro-batch contributed a SUM; divide once by the pair count.
    grads = jax.tree.map(lambda g: g / n_valid, grads)
    metrics = {**mean_metrics(sums), "loss": loss_sum / n_valid}
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["learning_rate"] = schedule(state["step"] - state["skipped"])   # optax's count
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
    """(loss sum, metric sums) of the whole batch: batch statistics as in training."""
    pols, pairs, whole_loss, _ = whole_batch_values(params, frozen, batch)
    return summarise(merge_rows(pols), *whole_loss(pols, spec.at_eval(loss_state)),
                     pairs["valid"])

  def example_metrics(params, loss_state, frozen, batch):
    """Per-example loss and metrics ([b] each) of one micro-batch, e.g. λ per pair."""
    _, loss_b, metrics = forward(params, spec.at_eval(loss_state), frozen, batch)
    metrics = {k: v.values if isinstance(v, losses.GroupMean) else v for k, v in metrics.items()}
    return {"loss": loss_b, **{k: v for k, v in metrics.items() if jnp.ndim(v) == 1}}

  return StepFns(train_step, eval_step, example_metrics)


def mean_metrics(sums: dict) -> dict:
  """{name: numerator / denominator}, and rewards/margins = chosen − rejected where a loss gives
  the two as group means (losses.GroupMean: unpaired rows), as TRL's KTOTrainer logs it."""
  out = {k: num / jnp.maximum(den, 1e-9) for k, (num, den) in sums.items()}
  if "rewards/margins" not in out and {"rewards/chosen", "rewards/rejected"} <= set(out):
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
  return out


def after_loop(tree, loop_output):
  """`tree`'s values, computed only once `loop_output` is (x + 0·t, exact for finite t).

  XLA:CPU runs independent parts of a program concurrently, and each device may order a loop's
  collectives and those beside it differently: they then wait for each other for ever (the
  whole-batch path's parameter all-gathers hoisted out of its second pass, its reference layer
  loop beside the policy's). Deriving what follows a loop from its output removes the race.
  Other backends order collectives by stream, one CPU device has none: `tree` as it is."""
  if jax.default_backend() != "cpu" or jax.device_count() == 1:
    return tree
  t = jnp.sum(loop_output) * 0
  return jax.tree.map(lambda x: x | (t != 0) if x.dtype == jnp.bool_ else x + t.astype(x.dtype),
                      tree)


def merge_rows(tree):
  """[k, 2b, ...] per micro-batch ([chosen; rejected] each) -> [2kb, ...] = [chosen of all
  micro-batches; rejected of all], the layout of one batch k times larger (None stays None)."""
  def merge(x):
    k, n = x.shape[:2]
    return x.reshape(k, 2, n // 2, *x.shape[2:]).swapaxes(0, 1).reshape(k * n, *x.shape[2:])
  return jax.tree.map(merge, tree)


def merge_pairs(x):
  """[k, b, ...] per micro-batch -> [kb, ...], pairs in the same order as merge_rows."""
  return x.reshape(-1, *x.shape[2:])


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
# Evaluation on held-out pairs
# =============================================================================================


def evaluate(run: build.Run, eval_jit, state) -> dict:
  if not run.eval_examples:
    return {}
  bs = run.config.eval_batch_size or run.config.batch_size
  totals = None
  for batch in preference.eval_batches(run.eval_examples, bs, run.train_data.buckets,
                                       run.train_data.pad_id, run.eval_columns,
                                       run.train_data.score_parts):
    out = eval_jit(state["params"], state["loss_state"], run.frozen,
                   build.to_device(microbatches(batch, 1), run))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  loss_sum, (_, sums) = jax.device_get(totals)
  metrics = {**mean_metrics(sums), "loss": loss_sum / len(run.eval_examples)}
  return {f"eval/{k}": float(v) for k, v in metrics.items()}


# =============================================================================================
# The loop
# =============================================================================================


def checkpoint_meta(run: build.Run, step: int) -> dict:
  return {"model": run.model_cfg.to_hf_dict(),
          "model_numerics": load.numerics(run.model_cfg),
          "step": step, "epoch": run.train_data.epoch(step),
          "config": run.config.to_json_best_effort()}


def log_pair_metrics(run: build.Run, state: dict, path: str, n: int):
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


def save_state(mgr, run: build.Run, state: dict, step: int, window=None):
  meta = {**checkpoint_meta(run, step), "log_window": window.saved() if window else None}
  checkpoint.save(mgr, step, state["params"], {k: v for k, v in state.items() if k != "params"},
                  meta, ref=run.ref_params if run.reference.saved else None)


def restore_state(mgr, run: build.Run, step: int) -> dict:
  """Restores the train state (and a TR-DPO reference into `run`) resharded onto run.mesh."""
  checkpoint.check_resume(mgr, step, run.model_cfg, run.reference.saved, run.config)
  abstract = checkpoint.abstract_like(run.state, run.state_shardings)
  abstract_ref = None if not run.reference.saved else checkpoint.abstract_like(
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
  run = build.setup(config, devices, workdir)
  build.check_vocabulary(run)
  os.makedirs(workdir, exist_ok=True)
  writers.save_tokenizer(run.tokenizer, os.path.join(workdir, "tokenizer"))
  mgr = checkpoint.manager(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
  state = run.state
  start = mgr.latest_step() or 0
  saved_window = None
  if start:   # initialisation precedence: resume workdir > init_from > scratch
    state = restore_state(mgr, run, start)
    saved_window = checkpoint.read_meta(mgr, start).get("log_window")
  elif config.log_pair_metrics:
    log_pair_metrics(run, state, os.path.join(workdir, "pairs_start.npz"),
                     config.log_pair_metrics)

  step_jit = run.jit_train_step()
  # A row's training metrics are means over the steps since the row before, as TRL logs them.
  window = writers.MetricsWindow(saved_window, at_step=tuple(state["loss_state"]))
  eval_jit = jax.jit(run.fns.eval_step)
  writer = writers.MetricsWriter(workdir, start, enabled=jax.process_index() == 0)
  last = {}
  bar = tqdm(range(start, run.steps), initial=start, total=run.steps, desc="dpo",
             disable=not config.progress or jax.process_index() != 0)
  # Steady-state step time: synced intervals between log points that compiled nothing.
  step_times, compiled_for = [], set()
  t_mark, n_since, clean = time.perf_counter(), 0, False
  preempt, pending = distributed.PreemptionFlag(), None
  try:
    for step in bar:
      batch_np = train_batch(run.train_data, step, config.grad_accum)
      if (sig := batch_signature(batch_np)) not in compiled_for:   # this interval compiles
        compiled_for.add(sig)
        clean = False
      state, metrics = step_jit(state, run.frozen, build.to_device(batch_np, run))
      window.add(metrics)
      done, n_since = step + 1, n_since + 1
      # The NaN/Inf check reads the PREVIOUS step's flag while this one runs (no stall), and
      # this step's before anything is logged or saved.
      if pending is not None:
        check_finite(pending, done - 1, config.nonfinite, mgr)
      if run.reference.update is not None and done % run.reference.every == 0:   # TR-DPO
        run.ref_params = run.reference.update(run.ref_params, state["params"])
      is_last = done == run.steps
      stop = preempt.is_set(done)
      evals = bool(config.eval_every) and (every(done, config.eval_every) or is_last)
      logs = every(done, config.log_every) or evals or is_last
      if logs or stop or every(done, config.ckpt_every):
        check_finite(metrics, done, config.nonfinite, mgr)
        pending = None
      else:
        pending = metrics
      if logs:
        metrics = window.row(metrics)
        if clean:
          step_times.append((time.perf_counter() - t_mark) / n_since)
        metrics["epoch"] = run.train_data.epoch(done)
        if evals:
          metrics.update(evaluate(run, eval_jit, state))
        timing = {"perf/step_s": float(np.median(step_times))} if step_times else {}
        writer.write(done, metrics, timing)
        last = {**metrics, **timing}
        bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                        acc=f"{metrics.get('rewards/accuracies', float('nan')):.2f}")
      if every(done, config.ckpt_every) or is_last or stop:
        save_state(mgr, run, state, done, window)
      if stop:
        raise distributed.Preempted(f"stopped by {preempt.signal_name} after step {done}; "
                                    f"checkpoint saved in {mgr.directory}; re-run the same "
                                    f"command to resume")
      if logs:   # the next interval starts after this row's evaluation and writing
        jax.block_until_ready(state["step"])
        t_mark, n_since, clean = time.perf_counter(), 0, True
    preempt.raise_if_late(run.steps, mgr.directory)
  finally:
    preempt.restore()
    writer.close()
    mgr.close()
  return last


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
  evals = [r for r in rows if "eval/loss" in r]
  print(f"\nmetrics:      {os.path.join(workdir, 'metrics.jsonl')} ({len(rows)} rows)")
  print(f"tensorboard:  {os.path.join(workdir, 'tensorboard')}")
  print(f"checkpoints:  {os.path.join(workdir, 'checkpoints')}")
  if last:
    print(f"last row:     loss {last['loss']:.4f}, train accuracy "
          f"{last.get('rewards/accuracies', float('nan')):.3f}, margin "
          f"{last.get('rewards/margins', float('nan')):.3f} (means since the row before)"
          + (f", {last['perf/step_s'] * 1e3:.1f} ms/step (median, steady state)"
             if "perf/step_s" in last else "")
          + (f", {int(last['skipped_steps'])} steps skipped as non-finite (config.nonfinite)"
             if last.get("skipped_steps") else ""))
  if evals:   # accuracy and margin where the loss logs them (KTO, BCO, NPO: no accuracy)
    first, final = evals[0], evals[-1]
    print(f"held-out:     loss {first['eval/loss']:.4f} (step {first['step']}) -> "
          f"{final['eval/loss']:.4f} (step {final['step']})" + "".join(
              f", {name} {first[k]:.3f} -> {final[k]:.3f}" for name, k in (
                  ("preference accuracy", "eval/rewards/accuracies"),
                  ("margin", "eval/rewards/margins")) if k in final))
