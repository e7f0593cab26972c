"""Multi-stage runs from one config: Pre-DPO's two stages, the synthetic task's SFT → pairs →
preference → evaluation.

A config with `config.stages` (a ConfigDict of stages) and `config.stage_order` (their names, in
order; ConfigDict itself iterates sorted) runs each stage in W/<stage>/. A stage is
a partial config: its keys override the base config for that stage only, and `kind` names what
the stage does (default "train"). Strings may refer to `{workdir}` (the pipeline's W), e.g.
Pre-DPO's stage 2 sets reference.path="{workdir}/stage1". Each stage resumes or skips on its
own, so re-running the command continues where it stopped.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Callable

import ml_collections

from dpo_jax import writers

# kind -> fn(stage_config, stage_workdir) -> result dict; other modules add kinds.
STAGE_KINDS: dict[str, Callable[[ml_collections.ConfigDict, str], Any]] = {}


def stage_kind(name: str):
  def deco(fn):
    STAGE_KINDS[name] = fn
    return fn
  return deco


@stage_kind("train")
def _train(config, workdir):
  from dpo_jax import train   # noqa: PLC0415
  return train.train_and_evaluate(config, workdir)


@stage_kind("synthetic_task")
def _synthetic_task(config, workdir):
  """Writes the synthetic task's demonstrations, prompts and tokenizer (deterministic)."""
  from dpo_jax.data import synthetic   # noqa: PLC0415
  return synthetic.write_task(workdir, n_demos=config.task.n_demos, n_eval=config.task.n_eval,
                              n_val=config.task.n_val, seed=config.seed)


@stage_kind("pairs")
def _pairs(config, workdir):
  """Samples from config.pairs.model, scores, pairs; W/<stage>/pairs.jsonl (kept if present)."""
  from dpo_jax import pairs   # noqa: PLC0415
  out = os.path.join(workdir, "pairs.jsonl")
  if (done := _finished(out)) is not None:
    return done
  p = config.pairs
  return pairs.generate_pairs(p.model, p.prompts, out, scorer=p.scorer,
                              sampling=_sampling(p, config.seed),
                              rule=p.rule, margin=p.margin, label_noise=p.label_noise,
                              max_prompts=p.max_prompts)


def _finished(out: str):
  """The stats of an output a previous run finished (its .stats.json is written last), or None."""
  if not os.path.exists(out + ".stats.json"):
    return None
  with open(out + ".stats.json") as f:
    return json.load(f)


def _sampling(p, seed):
  from dpo_jax import pairs   # noqa: PLC0415
  return pairs.Sampling(n=p.n, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                        max_new_tokens=p.max_new_tokens, batch_size=p.batch_size, seed=seed)


@stage_kind("samples")
def _samples(config, workdir):
  """config.pairs.model's responses to config.pairs.prompts as demonstrations (dSFT data)."""
  from dpo_jax import pairs   # noqa: PLC0415
  out = os.path.join(workdir, "samples.jsonl")
  if (done := _finished(out)) is not None:
    return done
  return pairs.write_samples(config.pairs.model, config.pairs.prompts, out,
                             sampling=_sampling(config.pairs, config.seed),
                             max_prompts=config.pairs.max_prompts)


@stage_kind("distill_pairs")
def _distill_pairs(config, workdir):
  """Teacher-chosen / student-rejected pairs: config.teacher.path vs config.pairs.model."""
  from dpo_jax import pairs   # noqa: PLC0415
  out = os.path.join(workdir, "pairs.jsonl")
  if (done := _finished(out)) is not None:
    return done
  return pairs.distill_pairs(config.teacher.path, config.pairs.model, config.pairs.prompts,
                             out, sampling=_sampling(config.pairs, config.seed),
                             max_prompts=config.pairs.max_prompts)


@stage_kind("evaluate")
def _evaluate(config, workdir):
  """Ground-truth evaluation of each of config.evaluate.policies against .baseline."""
  from dpo_jax import evaluate, pairs, sharding   # noqa: PLC0415
  out = os.path.join(workdir, "results.json")
  if os.path.exists(out):
    with open(out) as f:
      return json.load(f)
  e = config.evaluate
  mesh, rules = sharding.make_mesh(), sharding.DEFAULT_RULES
  reward_fn = pairs.function_scorer(e.reward)
  fn = lambda prompt, text: reward_fn([prompt], [[(None, text)]])[0][0]
  prompts = pairs.read_prompts(e.prompts)
  sampling = pairs.Sampling(n=e.n, temperature=e.temperature, max_new_tokens=e.max_new_tokens,
                            batch_size=e.batch_size, seed=config.seed + 1)
  baseline = pairs.Model.load(e.baseline, mesh, rules)
  results = {}
  for name, path in e.policies.items():
    policy = pairs.Model.load(path, mesh, rules)
    results[name] = evaluate.ground_truth(policy, baseline, prompts, fn, sampling, mesh, rules)
  os.makedirs(workdir, exist_ok=True)
  writers.write_atomic(out, lambda f: json.dump(results, f, indent=1))
  return results


def stage_config(config: ml_collections.ConfigDict, name: str,
                 workdir: str) -> tuple[str, ml_collections.ConfigDict]:
  """(kind, the full config of stage `name`) with its overrides applied."""
  stage = config.stages[name]
  out = copy.deepcopy(config)
  out.unlock()
  del out["stages"]
  del out["stage_order"]
  kind = stage.get("kind", "train")
  if kind not in STAGE_KINDS:
    raise ValueError(f"config.stages.{name}.kind={kind!r}; known kinds: {sorted(STAGE_KINDS)}")
  _override(out, stage, f"config.stages.{name}", workdir)
  _format_paths(out, workdir)
  out.lock()
  return kind, out


def _format_paths(c: ml_collections.ConfigDict, workdir: str):
  for key, value in c.items():
    if isinstance(value, ml_collections.ConfigDict):
      _format_paths(value, workdir)
    elif isinstance(value, str) and "{workdir}" in value:
      c[key] = value.replace("{workdir}", workdir)


def _override(target: ml_collections.ConfigDict, overrides, where: str, workdir: str):
  for key, value in overrides.items():
    if key == "kind":
      continue
    if key not in target:
      raise KeyError(f"{where}.{key}: not a key of the base config")
    if key == "loss" or (isinstance(target[key], ml_collections.ConfigDict)
                         and not target[key]):
      # A stage's loss replaces the base loss (its hparams differ); so does a filled-in empty
      # section such as evaluate.policies.
      target[key] = copy.deepcopy(value)
      continue
    if isinstance(value, ml_collections.ConfigDict) and isinstance(
        target[key], ml_collections.ConfigDict) and key != "stages":
      _override(target[key], value, f"{where}.{key}", workdir)
    else:
      target[key] = value


# Keys that change how a stage reports, not what it computes: a rerun may change them.
REPORTING = ("progress", "log_every", "eval_every", "log_pair_metrics", "ckpt_every",
             "keep_checkpoints")


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def check_stage(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The stage config to record in `workdir` (stage_config.json, REPORTING keys left out),
  after checking that a stage already there was written by the same one: a rerun under another
  config (a changed learning rate, say) is refused, naming the keys, rather than answered with
  what the old one wrote."""
  now = {k: v for k, v in _flat(json.loads(config.to_json_best_effort())).items()
         if k not in REPORTING}
  record = os.path.join(workdir, "stage_config.json")
  if os.path.exists(record):
    with open(record) as f:
      was = json.load(f)
    changed = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
    if changed:
      raise ValueError(
          f"{workdir} was written by another config of this stage (there vs now): "
          + "; ".join(f"{k}: {was.get(k)!r} vs {now.get(k)!r}" for k in changed[:8])
          + ("; ..." if len(changed) > 8 else "") + ". Rerun with the config that wrote it, or "
          "give a new workdir (or delete that directory to redo the stage)")
  return now


def run_stage(kind: str, config: ml_collections.ConfigDict, workdir: str):
  """Runs one stage in `workdir` (it resumes or skips on its own), its config checked against
  and recorded in the directory (check_stage)."""
  now = check_stage(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  writers.write_atomic(os.path.join(workdir, "stage_config.json"),
                       lambda f: json.dump(now, f, indent=1, sort_keys=True))
  return STAGE_KINDS[kind](config, workdir)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the stages in order, each in W/<stage>. Every stage's config is resolved (its keys
  checked) and checked against what its directory holds before the first one starts."""
  from dpo_jax import build, losses   # noqa: PLC0415
  order = tuple(config.stage_order)
  if sorted(order) != sorted(config.stages):
    raise ValueError(f"config.stage_order={order} must name each of config.stages "
                     f"{sorted(config.stages)} once")
  stages = [(name, *stage_config(config, name, workdir)) for name in order]
  for name, kind, cfg in stages:
    if kind == "train":
      build.check_config(cfg)
      build.loss_hparams(cfg.loss, losses.get(cfg.loss.name))
    check_stage(cfg, os.path.join(workdir, name))
  return {name: run_stage(kind, cfg, os.path.join(workdir, name)) for name, kind, cfg in stages}


def print_summary(workdir: str, results: dict[str, Any]):
  from dpo_jax import train   # noqa: PLC0415
  for name, result in results.items():
    print(f"\n== stage {name}: {os.path.join(workdir, name)}")
    if isinstance(result, dict) and os.path.exists(os.path.join(workdir, name, "metrics.jsonl")):
      train.print_summary(os.path.join(workdir, name), result)
    elif result:
      print(result)
