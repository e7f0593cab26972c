"""Shared machinery of the synthetic-task experiment scripts (pre_dpo_table.py, dadpo_table.py).

A `Seed` is one seed's workdir holding pipeline stages (dpo_jax/pipeline.py): the task, models
trained from it, and evaluations. Stages already done are skipped, so a script can be re-run.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import ml_collections
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dpo_jax import pipeline  # noqa: E402

METRICS = ("reward", "win_rate", "kl", "length")


def load_synthetic_config():
  spec = importlib.util.spec_from_file_location("synthetic_config",
                                                os.path.join(REPO, "configs", "synthetic.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


SYN = load_synthetic_config()


class Seed:
  """One seed's workdir; `add` stages, `run_pending` runs them in order."""

  def __init__(self, workdir: str, seed: int, *, label_noise: float = 0.0,
               batch_size: int = 16, quick: bool = False):
    self.workdir, self.seed = workdir, seed
    self.base = SYN.base(ml_collections.ConfigDict({"label_noise": label_noise}))
    self.base.seed = seed
    self.base.progress = False
    self.base.batch_size = batch_size
    self.base.pairs.max_prompts = 0   # every training prompt
    if quick:   # a smoke test of a script, not a result
      self.base.task.n_demos, self.base.pairs.max_prompts, self.base.evaluate.n = 256, 96, 2
    self.stages, self.order, self.pending = ml_collections.ConfigDict(), [], []

  def add(self, name: str, stage: ml_collections.ConfigDict) -> str:
    if name not in self.order:
      self.stages[name] = stage
      self.order.append(name)
      self.pending.append(name)
    return name

  def run_pending(self):
    c = ml_collections.ConfigDict(self.base.to_dict())
    c.stages = self.stages
    c.stage_order = tuple(self.order)
    for name in self.pending:
      kind, cfg = pipeline.stage_config(c, name, self.workdir)
      pipeline.run_stage(kind, cfg, os.path.join(self.workdir, name))
    self.pending = []

  def read_stats(self, stage: str, file: str) -> dict:
    with open(os.path.join(self.workdir, stage, file + ".stats.json")) as f:
      return json.load(f)

  def evaluate(self, name: str, split: str, baseline: str = "sft") -> dict:
    """Ground truth of model `name` against `baseline` on prompts_<split> (val | eval)."""
    stage_name = f"eval_{split}_{name}" + ("" if baseline == "sft" else f"_vs_{baseline}")
    self.add(stage_name, ml_collections.ConfigDict({"kind": "evaluate", "evaluate": {
        "policies": {name: "{workdir}/" + name}, "baseline": "{workdir}/" + baseline,
        "prompts": "{workdir}/task/prompts_%s.jsonl" % split}}))
    self.run_pending()
    with open(os.path.join(self.workdir, stage_name, "results.json")) as f:
      return json.load(f)[name]


def epoch_steps(n_examples: int, batch_size: int, eval_fraction: float = 0.05) -> int:
  """Steps in one epoch over the examples left after holding out eval_fraction."""
  return -(-int(n_examples * (1 - eval_fraction)) // batch_size)


def grid_search(methods, grid, val_reward):
  """The paper's selection rule: for each method in order, the hyperparameters of grid(method,
  chosen) with the best val_reward(method, hp, chosen); later methods may build on earlier
  choices. Returns (chosen {method: hp}, log {method: {hp json: reward}})."""
  chosen, log = {}, {}
  for method in methods:
    scores = {json.dumps(hp): val_reward(method, hp, chosen) for hp in grid(method, chosen)}
    best = max(scores, key=scores.get)
    chosen[method], log[method] = json.loads(best), scores
    print(f"[select] {method}: val reward {scores} -> {best}", flush=True)
  return chosen, log


def hp_name(method: str, hp: dict) -> str:
  return method + "".join(f"_{k[0]}{v:g}".replace(".", "p") for k, v in sorted(hp.items()))


def markdown(rows, saved: dict, footer: str) -> str:
  """rows: [(label, key)]; saved: a results.json, with "results" {label: [metric dicts over
  seeds]} and "chosen" {key: hp}."""
  results, chosen = saved["results"], saved["chosen"]
  out = ["| method | hyperparameters | true reward | win rate | KL | length |",
         "|---|---|---|---|---|---|"]
  for label, key in rows:
    cells = []
    for m in METRICS:
      v = np.array([r[m] for r in results[label]])
      cells.append(f"{v.mean():.3f} ± {v.std():.3f}")   # ddof=0, as the footers say
    hp = ", ".join(f"{k}={v:g}" for k, v in chosen.get(key, {}).items()) or "–"
    out.append(f"| {label} | {hp} | " + " | ".join(cells) + " |")
  return "\n".join(out) + "\n\n" + footer + "\n"


def write_results(workdir: str, saved: dict, table: str):
  """Prints the table and writes it to W/table.md, and `saved` (every seed's numbers, the
  chosen hyperparameters, the grid, the wall time) to W/results.json."""
  print(table)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(table)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(saved, f, indent=1)


def bar_plots(axes, labels, results, titles):
  for ax, metric in zip(axes, titles):
    vals = [np.array([r[metric] for r in results[label]]) for label in labels]
    ax.bar(range(len(labels)), [v.mean() for v in vals], yerr=[v.std() for v in vals],
           capsize=3, color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_title(titles[metric])


def pyplot():
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
  except ImportError:
    print("matplotlib is not installed (pip install -e '.[plot]'); no PNG written")
    return None
