"""The miniature of Pre-DPO's Table 1 (arXiv 2504.15843) on the synthetic ground-truth task.

For each seed: write the task, SFT a tiny Llama on imperfect demonstrations, sample pairs from
it labelled by the true reward; then, all from the same SFT policy and the same pairs:

  DPO              reference = SFT, 1 epoch
  SimPO            no reference, 1 epoch
  Pre-DPO (DPO)    reference = the 1-epoch DPO model (the guide), 1 epoch from SFT again
  Pre-DPO (SimPO)  reference = the 1-epoch SimPO model, 1 epoch from SFT again
  DPO 2 epochs     the compute-matched ablation (paper's Table 2): guide + Pre-DPO = 2 epochs

Hyperparameters follow the paper's rule: a grid search per method (its Table 4 lists the best
β / γ per method and model), here over β (and γ for SimPO) at a fixed learning rate, selected by
mean true reward on VALIDATION prompts of seed 0 (disjoint from the held-out prompts of the
table), then fixed for every seed. Pre-DPO's guides are the selected DPO / SimPO models.

    python experiments/pre_dpo_table.py --workdir /tmp/pre_dpo_table [--seeds 0 1 2]

Prints a markdown table (mean ± std over seeds of held-out true reward, win rate vs SFT,
KL(π‖π_SFT), length), writes it to W/table.md with W/results.json, and plots W/pre_dpo_table.png
(the table as bars, and the per-pair DPO gradient weight λ at the start of DPO vs Pre-DPO).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

import ml_collections
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dpo_jax import pipeline  # noqa: E402


def load_synthetic_config():
  spec = importlib.util.spec_from_file_location("synthetic_config",
                                                os.path.join(REPO, "configs", "synthetic.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


SYN = load_synthetic_config()

BETAS = (0.1, 0.3, 1.0, 3.0)
GRIDS = {   # per method: hyperparameter sets searched on seed 0
    "dpo": [{"beta": b} for b in BETAS],
    "simpo": [{"beta": b, "gamma": g} for b in (2.5, 5.0, 10.0) for g in (0.5, 1.5)],
    "pre_dpo_dpo": [{"beta": b} for b in BETAS],
    "pre_dpo_simpo": [{"beta": b} for b in BETAS],
    "dpo_2ep": [{"beta": b} for b in BETAS],
}
ROWS = [("SFT", None), ("DPO", "dpo"), ("SimPO", "simpo"), ("Pre-DPO (DPO)", "pre_dpo_dpo"),
        ("Pre-DPO (SimPO)", "pre_dpo_simpo"), ("DPO 2 epochs", "dpo_2ep")]
METRICS = ("reward", "win_rate", "kl", "length")


def run_name(method: str, hp: dict) -> str:
  return method + "".join(f"_{k[0]}{v:g}".replace(".", "p") for k, v in sorted(hp.items()))


class Seed:
  """One seed's workdir: shared stages (task, SFT, pairs) plus any number of runs."""

  def __init__(self, workdir: str, seed: int, args):
    self.workdir, self.seed, self.args = workdir, seed, args
    arg = ml_collections.ConfigDict({"label_noise": args.label_noise})
    self.base = SYN.base(arg)
    self.base.seed = seed
    self.base.progress = False
    self.base.batch_size = args.batch_size
    self.base.pairs.max_prompts = 0   # one best-vs-worst pair from every training prompt
    if args.quick:   # a smoke test of the whole script, not a result
      self.base.task.n_demos, self.base.pairs.max_prompts, self.base.evaluate.n = 256, 96, 2
    self.stages, self.order, self.pending = ml_collections.ConfigDict(), [], []
    self.add("task", ml_collections.ConfigDict({"kind": "synthetic_task"}))
    self.add("sft", SYN.sft_stage(args.sft_steps))
    self.add("pairs", ml_collections.ConfigDict({"kind": "pairs"}))
    self.run_pending()
    with open(os.path.join(workdir, "pairs", "pairs.jsonl.stats.json")) as f:
      n_pairs = json.load(f)["pairs"]
    # 95% of the pairs train (data.eval_fraction = 0.05 are held out for eval/ metrics).
    self.epoch_steps = math.ceil(int(n_pairs * 0.95) / self.base.batch_size)

  def add(self, name, stage):
    if name not in self.order:
      self.stages[name] = stage
      self.order.append(name)
      self.pending.append(name)

  def run_pending(self):
    c = ml_collections.ConfigDict(self.base.to_dict())
    c.stages = self.stages
    c.stage_order = tuple(self.order)
    for name in self.pending:
      kind, cfg = pipeline.stage_config(c, name, self.workdir)
      pipeline.STAGE_KINDS[kind](cfg, os.path.join(self.workdir, name))
    self.pending = []

  def train(self, method: str, hp: dict, guide: str | None = None) -> str:
    loss = "simpo" if method == "simpo" else "dpo"
    epochs = 2 if method == "dpo_2ep" else 1
    stage = SYN.preference_stage(loss, epochs * self.epoch_steps, **hp)
    stage.optim.lr = self.args.lr
    if guide:   # Pre-DPO: same start (SFT), the guide as reference
      stage.reference = ml_collections.ConfigDict({"mode": "checkpoint",
                                                   "path": "{workdir}/" + guide})
    name = run_name(method, hp)
    self.add(name, stage)
    return name

  def evaluate(self, name: str, split: str) -> dict:
    stage_name = f"eval_{split}_{name}"
    e = ml_collections.ConfigDict({"kind": "evaluate", "evaluate": {
        "policies": {name: "{workdir}/" + name},
        "prompts": "{workdir}/task/prompts_%s.jsonl" % split}})
    self.add(stage_name, e)
    self.run_pending()
    with open(os.path.join(self.workdir, stage_name, "results.json")) as f:
      return json.load(f)[name]


def select(seed0: Seed) -> dict[str, dict]:
  """Grid search on seed 0's validation prompts; guides are the selected DPO / SimPO runs."""
  chosen, log = {}, {}
  for method in ("dpo", "simpo", "dpo_2ep", "pre_dpo_dpo", "pre_dpo_simpo"):
    guide = None
    if method.startswith("pre_dpo_"):
      g = method[len("pre_dpo_"):]
      guide = run_name(g, chosen[g])
    scores = {}
    for hp in GRIDS[method]:
      name = seed0.train(method, hp, guide)
      scores[json.dumps(hp)] = seed0.evaluate(name, "val")["reward"]
    best = max(scores, key=scores.get)
    chosen[method], log[method] = json.loads(best), scores
    print(f"[select] {method}: val reward {scores} -> {best}", flush=True)
  return chosen, log


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--label_noise", type=float, default=0.0)
  p.add_argument("--lr", type=float, default=5e-4)
  p.add_argument("--sft_steps", type=int, default=400)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--quick", action="store_true", help="tiny sizes and one grid point per "
                 "method: checks the script runs, numbers mean nothing")
  args = p.parse_args()
  if args.quick:
    args.sft_steps = 20
    for k in GRIDS:
      GRIDS[k] = GRIDS[k][:1]
  t0 = time.time()
  seeds = {s: Seed(os.path.join(args.workdir, f"seed{s}"), s, args) for s in args.seeds[:1]}
  chosen, grid_log = select(seeds[args.seeds[0]])
  results = {label: [] for label, _ in ROWS}
  lambdas = {}
  for s in args.seeds:
    seed = seeds.get(s) or Seed(os.path.join(args.workdir, f"seed{s}"), s, args)
    results["SFT"].append(seed.evaluate("sft", "eval"))
    for label, method in ROWS[1:]:
      guide = None
      if method.startswith("pre_dpo_"):
        g = method[len("pre_dpo_"):]
        guide = run_name(g, chosen[g])
      name = seed.train(method, chosen[method], guide)
      results[label].append(seed.evaluate(name, "eval"))
      if s == args.seeds[0] and method in ("dpo", "pre_dpo_dpo", "pre_dpo_simpo"):
        lambdas[label] = np.load(os.path.join(seed.workdir, name, "pairs_start.npz"))["lambda"]
  table = markdown(results, chosen, args, time.time() - t0)
  print(table)
  with open(os.path.join(args.workdir, "table.md"), "w") as f:
    f.write(table)
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump({"results": results, "chosen": chosen, "grid": grid_log,
               "seconds": time.time() - t0}, f, indent=1)
  plot(results, lambdas, os.path.join(args.workdir, "pre_dpo_table.png"))


def markdown(results, chosen, args, seconds) -> str:
  head = ("| method | hyperparameters | true reward | win rate vs SFT | KL(π‖π_SFT) | length |\n"
          "|---|---|---|---|---|---|\n")
  lines = []
  for label, method in ROWS:
    rs = results[label]
    cells = []
    for m in METRICS:
      v = np.array([r[m] for r in rs])
      cells.append(f"{v.mean():.3f} ± {v.std():.3f}")
    hp = "–" if method is None else ", ".join(f"{k}={v:g}" for k, v in chosen[method].items())
    lines.append(f"| {label} | {hp} | " + " | ".join(cells) + " |")
  foot = (f"\nmean ± std over seeds {args.seeds}; lr {args.lr:g}, batch {args.batch_size}, "
          f"label noise "
          f"{args.label_noise:g}; wall time {seconds / 60:.1f} min.\n")
  return head + "\n".join(lines) + "\n" + foot


def plot(results, lambdas, path):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed (pip install -e '.[plot]'); no PNG written")
    return
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  labels = [label for label, _ in ROWS]
  for ax, metric in zip(axes[:2], ("reward", "win_rate")):
    vals = [np.array([r[metric] for r in results[label]]) for label in labels]
    ax.bar(range(len(labels)), [v.mean() for v in vals], yerr=[v.std() for v in vals],
           capsize=3, color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_title({"reward": "held-out true reward", "win_rate": "win rate vs SFT"}[metric])
  ax = axes[2]
  for label, lam in lambdas.items():
    ax.hist(lam, bins=40, range=(0, 1), alpha=0.6, label=label)
  ax.set_title("DPO gradient weight λ per pair at the first step")
  ax.set_xlabel("λ = σ(β(r_l − r_w))")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
