"""Setup: a config becomes everything the training loop needs (`Run`): the mesh, the model and
its parameters, the tokenised data, the reference and teacher, the train state and its
shardings, and the jitted step's pure functions (train.make_train_step).

    run = build.setup(config)
    state, metrics = run.jit_train_step()(run.state, run.frozen, build.to_device(batch, run))
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpo_jax import distributed, losses, optim, reference, sharding, teacher, train
from dpo_jax.data import packing, preference
from dpo_jax.models import core, load
from dpo_jax.models.config import ModelConfig, check_dtype

Array = jax.Array



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
  fns: train.StepFns
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
  if given.get("base", known.get("base")) != known.get("base"):   # the flags are the base's
    raise ValueError(f"config.loss.base={given['base']!r}: name the wrapper bound to it, "
                     f"config.loss.name='{spec.name}({given['base']})' (what the step computes "
                     f"and the base's hyperparameters come from the base)")
  return {**known, **given}


def scratch_model(model_cfg: ml_collections.ConfigDict) -> ModelConfig:
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  return ModelConfig(**{k: v for k, v in model_cfg.items() if k in fields})


def load_data(config, tokenizer, pad_id: int, workdir: str | None = None):
  opts = preference.TokenizeOptions(config.data.max_length, config.data.max_prompt_length,
                                    config.data.truncation_mode, config.data.add_bos)
  # W/data_cache: a rerun of the same job (a resume) reads the examples instead of tokenising.
  cache = os.path.join(workdir, "data_cache") if workdir and config.data.cache else None
  keep = config.data.cache_keep
  if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
    raise ValueError(f"config.data.cache_keep={keep!r} must be an integer >= 0 (0: keep every "
                     f"file of W/data_cache)")
  streaming = config.data.streaming   # a bool: ml_collections refuses another type
  if not config.data.train:
    raise ValueError(f"config.data.train={config.data.train!r}: give a .jsonl/.json file, a "
                     f"dataset directory or a hub dataset name")
  source, rows = preference.load_rows(config.data.train, config.data.split, streaming)
  split = distributed.tokenize_split()   # several processes: each tokenises 1/n of the rows
  examples, skipped = preference.tokenize_cached(cache, rows, tokenizer, opts, source,
                                                 config.data.on_error, **split, keep=keep)
  if config.data.eval:
    esplit = config.data.eval_split   # None: "test" of a source with splits
    esource, erows = preference.load_rows(config.data.eval, esplit or "test", streaming,
                                          strict=esplit is not None)
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


def check_config(config: ml_collections.ConfigDict):
  """Settings that would otherwise run and silently train the wrong thing (or lose it)."""
  def need(ok, key, value, what):
    if not ok:
      raise ValueError(f"config.{key}={value!r} {what}")
  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
  need(config.nonfinite in ("stop", "skip"), "nonfinite", config.nonfinite,
       "must be 'stop' or 'skip'")
  need(is_int(config.grad_accum) and config.grad_accum >= 1, "grad_accum", config.grad_accum,
       "must be an integer >= 1")
  need(is_int(config.keep_checkpoints) and config.keep_checkpoints >= 1, "keep_checkpoints",
       config.keep_checkpoints, "must be an integer >= 1 (the last checkpoint is the result)")
  need(0 <= config.data.eval_fraction < 1, "data.eval_fraction", config.data.eval_fraction,
       "must be in [0, 1)")
  need(config.optim.lr > 0, "optim.lr", config.optim.lr, "must be > 0")
  need(0 <= config.optim.warmup_ratio <= 1, "optim.warmup_ratio", config.optim.warmup_ratio,
       "must be in [0, 1]")
  need(config.get("epochs", 0) >= 0, "epochs", config.get("epochs", 0),
       "must be >= 0 (0: train config.steps steps)")
  ref = config.reference
  if ref.mode == "sync":   # TR-DPO
    need(0.0 < ref.sync_alpha <= 1.0, "reference.sync_alpha", ref.sync_alpha,
         "must be in (0, 1]")
    need(is_int(ref.sync_every) and ref.sync_every >= 1, "reference.sync_every",
         ref.sync_every, "must be an integer >= 1")
    check_dtype(ref.dtype, "config.reference.dtype")
    need(ref.dtype == "float32", "reference.dtype", ref.dtype,
         f"with config.reference.mode='sync': a TR-DPO update that moves a weight by less than "
         f"half a {ref.dtype} ulp is rounded away (at sync_alpha=0.01 the reference never "
         f"moves); keep the moving reference in float32")
  loss = config.loss
  if isinstance(loss.get("beta"), (int, float)):
    need(loss.beta > 0, "loss.beta", loss.beta, "must be > 0 (β <= 0 prefers the rejected "
         "answers or learns nothing)")
  if isinstance(loss.get("label_smoothing"), (int, float)):
    need(0 <= loss.label_smoothing <= 0.5, "loss.label_smoothing", loss.label_smoothing,
         "must be in [0, 0.5] (the assumed probability that a label is flipped)")


def check_vocabulary(run: Run):
  """Every token id of the training and held-out data (and the pad id) must index the model's
  embedding; past it, the step's gather returns garbage and the loss turns NaN. Called where the
  data is trained on (the loop, the bench on real data), not on the bench's stand-in rows."""
  vocab, name = run.model_cfg.vocab_size, run.config.model.tokenizer or run.config.model.init
  # Held-out examples split off the training rows are views of the same token array: read once.
  arrays = {id(e.tokens): e.tokens for e in (run.train_data.examples, run.eval_examples)
            if len(e)}
  for tokens in arrays.values():
    top = preference.largest_id(tokens, run.train_data.pad_id)
    if top >= vocab:
      raise ValueError(f"config.model.vocab_size={vocab} is too small for the tokenizer "
                       f"{name or '(built in)'}: the data holds token id {top}; set it to at "
                       f"least {top + 1}")


def setup(config: ml_collections.ConfigDict, devices=None, workdir: str | None = None) -> Run:
  check_config(config)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
  rules = sharding.rules_from_config(config.mesh.rules.to_dict())
  spec = losses.get(config.loss.name)
  hparams = loss_hparams(config.loss, spec)
  numerics = {k: config.model[k] for k in load.NUMERICS}
  model_cfg = load.model_config(config.model.init, scratch_model(config.model), **numerics)
  tokenizer = load.load_tokenizer(config.model.tokenizer or config.model.init)
  pad_id = preference.pad_id(tokenizer)
  train_data, eval_examples, skipped = load_data(config, tokenizer, pad_id, workdir)
  if skipped and jax.process_index() == 0:
    print(f"config.data.on_error='skip': {skipped} rows of {config.data.train}"
          f"{' and ' + config.data.eval if config.data.eval else ''} skipped (bad rows)",
          file=sys.stderr)

  n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = config.batch_size // max(config.grad_accum, 1)
  if micro % n_batch:
    raise ValueError(f"config.batch_size={config.batch_size} / config.grad_accum="
                     f"{config.grad_accum} = {micro} pairs per micro-batch is not divisible by "
                     f"the {n_batch} data×fsdp devices of config.mesh")
  if isinstance(train_data, packing.PackedBatches):
    train_data.row_multiple = n_batch   # packed rows shard evenly over data×fsdp
    train_data.check_row_buckets(config.grad_accum)

  params = load.load_params(config.model.init, model_cfg, mesh, rules, config.seed)
  ref = reference.build(
      config.reference.mode, config.reference, spec, model_cfg, params, mesh, rules,
      chunk=config.logprob_chunk, stats=train.side_stats(spec, train.REF_STATS), tokens=spec.needs_tokens,
      workdir=workdir, batch_size=config.eval_batch_size or config.batch_size,
      buckets=train_data.buckets, pad_id=pad_id, tokenizer=tokenizer)
  te = teacher.build(config.teacher, spec, model_cfg, mesh, rules, chunk=config.logprob_chunk,
                     workdir=workdir, batch_size=config.eval_batch_size or config.batch_size,
                     buckets=train_data.buckets, pad_id=pad_id, student_tokenizer=tokenizer)
  train_data.columns = {**ref.columns(train_data.examples, "train"),
                        **te.columns(train_data.examples, "train")}
  eval_columns = ({**ref.columns(eval_examples, "eval"), **te.columns(eval_examples, "eval")}
                  if eval_examples else {})
  ref.columns = te.columns = reference.no_columns   # release the weights they hold
  steps = total_steps(config, len(train_data.examples))
  tx, schedule = optim.make_optimizer(config.optim, steps)
  graphdef = core.split(model_cfg)[0]
  fns = train.make_train_step(graphdef, spec, hparams, tx, schedule, ref.logps_fn,
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
