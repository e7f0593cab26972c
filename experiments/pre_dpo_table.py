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

Prints a markdown table (mean ± population std (ddof=0) over seeds of held-out true reward,
win rate vs SFT, KL(π‖π_SFT), length), writes it to W/table.md with W/results.json, and plots
W/pre_dpo_table.png (the table as bars, and the per-pair DPO gradient weight λ at the start of
DPO vs Pre-DPO).
"""
from __future__ import annotations

import argparse
import os
import time

import ml_collections
import numpy as np

import synthetic_runs as runs

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


class PreDPOSeed(runs.Seed):
  def __init__(self, workdir, seed, args):
    super().__init__(workdir, seed, label_noise=args.label_noise, batch_size=args.batch_size,
                     quick=args.quick)
    self.lr = args.lr
    self.add("task", ml_collections.ConfigDict({"kind": "synthetic_task"}))
    self.add("sft", runs.SYN.sft_stage(args.sft_steps))
    self.add("pairs", ml_collections.ConfigDict({"kind": "pairs"}))
    self.run_pending()
    self.epoch = runs.epoch_steps(self.read_stats("pairs", "pairs.jsonl")["pairs"],
                                  self.base.batch_size)

  def train(self, method: str, hp: dict, guide: str | None = None) -> str:
    loss = "simpo" if method == "simpo" else "dpo"
    stage = runs.SYN.preference_stage(loss, (2 if method == "dpo_2ep" else 1) * self.epoch, **hp)
    stage.optim.lr = self.lr
    if guide:   # Pre-DPO: the same start (SFT), the guide as reference
      stage.reference = ml_collections.ConfigDict({"mode": "checkpoint",
                                                   "path": "{workdir}/" + guide})
    return self.add(runs.hp_name(method, hp), stage)


def guide_of(method, chosen):
  if not method.startswith("pre_dpo_"):
    return None
  g = method[len("pre_dpo_"):]
  return runs.hp_name(g, chosen[g])


def select(seed0: PreDPOSeed):
  """Grid search on seed 0's validation prompts; guides are the selected DPO / SimPO runs."""
  return runs.grid_search(
      ("dpo", "simpo", "dpo_2ep", "pre_dpo_dpo", "pre_dpo_simpo"),
      lambda method, chosen: GRIDS[method],
      lambda method, hp, chosen: seed0.evaluate(
          seed0.train(method, hp, guide_of(method, chosen)), "val")["reward"])


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--label_noise", type=float, default=0.0)
  p.add_argument("--lr", type=float, default=5e-4)
  p.add_argument("--sft_steps", type=int, default=400)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--quick", action="store_true", help="tiny sizes and one grid point per "
                 "method: checks the script runs, numbers mean nothing")
  return p


CAPTION = ("Held-out true reward, win rate vs SFT, KL(π‖π_SFT) and length: mean ± population "
           "std (ddof=0) over seeds {seeds}; lr {lr:g}, batch {batch_size}, label noise "
           "{label_noise:g}; wall time {minutes:.1f} min.")


def table(saved: dict, args) -> str:
  """The markdown table of a results.json (`saved`) written with these arguments."""
  return runs.markdown(ROWS, saved, CAPTION.format(**vars(args), minutes=saved["minutes"]))


def main():
  args = parser().parse_args()
  if args.quick:
    args.sft_steps = 20
    for k in GRIDS:
      GRIDS[k] = GRIDS[k][:1]
  t0 = time.time()
  seed_dir = lambda s: os.path.join(args.workdir, f"seed{s}")
  seeds = {args.seeds[0]: PreDPOSeed(seed_dir(args.seeds[0]), args.seeds[0], args)}
  chosen, grid_log = select(seeds[args.seeds[0]])
  results = {label: [] for label, _ in ROWS}
  lambdas = {}
  for s in args.seeds:
    seed = seeds.get(s) or PreDPOSeed(seed_dir(s), s, args)
    results["SFT"].append(seed.evaluate("sft", "eval"))
    for label, method in ROWS[1:]:
      name = seed.train(method, chosen[method], guide_of(method, chosen))
      results[label].append(seed.evaluate(name, "eval"))
      if s == args.seeds[0] and method in ("dpo", "pre_dpo_dpo", "pre_dpo_simpo"):
        lambdas[label] = np.load(os.path.join(seed.workdir, name, "pairs_start.npz"))["lambda"]
  saved = {"results": results, "chosen": chosen, "grid": grid_log,
           "minutes": (time.time() - t0) / 60}
  runs.write_results(args.workdir, saved, table(saved, args))
  plot(results, lambdas, os.path.join(args.workdir, "pre_dpo_table.png"))


def plot(results, lambdas, path):
  plt = runs.pyplot()
  if plt is None:
    return
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  runs.bar_plots(axes[:2], [label for label, _ in ROWS], results,
                 {"reward": "held-out true reward", "win_rate": "win rate vs SFT"})
  for label, lam in lambdas.items():
    axes[2].hist(lam, bins=40, range=(0, 1), alpha=0.6, label=label)
  axes[2].set_title("DPO gradient weight λ per pair at the first step")
  axes[2].set_xlabel("λ = σ(β(r_l − r_w))")
  axes[2].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
