"""daDPO (arXiv 2506.15717) on the synthetic ground-truth task: distilling a stronger teacher.

For each seed:
  teacher      a larger model (d=128, 3 layers), SFT on the demonstrations then DPO on its own
               reward-labelled pairs: the stronger model to distil from
  SFT          the student (d=32, 1 layer) trained on the demonstrations (reference row)
  dSFT         the student trained on the teacher's responses (black-box distillation)
  dDPO         DPO from dSFT on pairs chosen = teacher's response, rejected = dSFT student's
  daDPO (seq)  the same pairs and start, loss dadpo: the teacher's sequence log-probs enter
               the DPO logit (β1 = β, β2 = the teacher's weight)
  daDPO (tok)  the same, loss dadpo_token: DPO + β2·KL(π_te ‖ π_θ) per token, from the teacher's
               full next-token distributions computed in the step

Win rate and KL are against dSFT, the start of dDPO and daDPO. Hyperparameters: dDPO's β from a
grid, then daDPO's β2 from a grid at that β, all selected by mean true reward on validation
prompts of seed 0 (disjoint from the held-out prompts of the table), as in pre_dpo_table.py.

    python experiments/dadpo_table.py --workdir /tmp/dadpo_table [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import os
import time

import ml_collections

import synthetic_runs as runs

TEACHER = {"hidden_size": 128, "intermediate_size": 384, "num_layers": 3, "num_heads": 4,
           "num_kv_heads": 2}
STUDENT = {"hidden_size": 32, "intermediate_size": 96, "num_layers": 1, "num_heads": 4,
           "num_kv_heads": 2}
GRIDS = {"ddpo": [{"beta": b} for b in (0.1, 0.3, 1.0)],
         "dadpo_seq": [{"beta2": b} for b in (0.1, 0.3, 1.0)],
         "dadpo_tok": [{"beta2": b} for b in (0.03, 0.1, 0.3)]}
ROWS = [("teacher", "teacher"), ("SFT", "sft"), ("dSFT", "dsft"), ("dDPO", "ddpo"),
        ("daDPO (seq)", "dadpo_seq"), ("daDPO (tok)", "dadpo_tok")]


def sized(stage: ml_collections.ConfigDict, size: dict) -> ml_collections.ConfigDict:
  stage.model = ml_collections.ConfigDict({**stage.get("model", {}), **size})
  return stage


class DistillSeed(runs.Seed):
  def __init__(self, workdir, seed, args):
    super().__init__(workdir, seed, batch_size=args.batch_size, quick=args.quick)
    self.args = args
    syn = runs.SYN
    steps = (20, 20, 8) if args.quick else (args.sft_steps, args.sft_steps, 300)
    self.add("task", ml_collections.ConfigDict({"kind": "synthetic_task"}))
    self.add("teacher_sft", sized(syn.sft_stage(steps[0]), TEACHER))
    self.add("teacher_pairs", ml_collections.ConfigDict(
        {"kind": "pairs", "pairs": {"model": "{workdir}/teacher_sft"}}))
    teacher = syn.preference_stage("dpo", steps[2], beta=1.0)
    teacher.model.init = "{workdir}/teacher_sft"
    teacher.data.train = "{workdir}/teacher_pairs/pairs.jsonl"
    self.add("teacher", teacher)
    self.add("sft", sized(syn.sft_stage(steps[1]), STUDENT))
    self.add("teacher_samples", ml_collections.ConfigDict(
        {"kind": "samples", "pairs": {"model": "{workdir}/teacher", "n": 1}}))
    dsft = sized(syn.sft_stage(steps[1]), STUDENT)
    dsft.data.train = "{workdir}/teacher_samples/samples.jsonl"
    self.add("dsft", dsft)
    self.add("dpairs", ml_collections.ConfigDict(
        {"kind": "distill_pairs", "pairs": {"model": "{workdir}/dsft"},
         "teacher": {"path": "{workdir}/teacher"}}))
    self.run_pending()
    self.epoch = runs.epoch_steps(self.read_stats("dpairs", "pairs.jsonl")["pairs"],
                                  self.base.batch_size)

  def train(self, method: str, hp: dict) -> str:
    loss = {"ddpo": "dpo", "dadpo_seq": "dadpo", "dadpo_tok": "dadpo_token"}[method]
    stage = runs.SYN.preference_stage(loss, self.args.epochs * self.epoch, **hp)
    stage.optim.lr = self.args.lr
    stage.model.init = "{workdir}/dsft"
    stage.data.train = "{workdir}/dpairs/pairs.jsonl"
    if loss != "dpo":
      stage.teacher = ml_collections.ConfigDict({"mode": "step", "path": "{workdir}/teacher"})
    return self.add(runs.hp_name(method, hp), stage)


def select(seed0: DistillSeed):
  """dDPO's β first, then each daDPO form's β2 at that β (seed 0's validation prompts)."""
  return runs.grid_search(
      ("ddpo", "dadpo_seq", "dadpo_tok"),
      lambda method, chosen: (GRIDS[method] if method == "ddpo"
                              else [{**chosen["ddpo"], **hp} for hp in GRIDS[method]]),
      lambda method, hp, chosen: seed0.evaluate(
          seed0.train(method, hp), "val", baseline="dsft")["reward"])


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--lr", type=float, default=5e-4)
  p.add_argument("--epochs", type=int, default=2)
  p.add_argument("--sft_steps", type=int, default=400)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--quick", action="store_true", help="tiny sizes, one grid point: checks the "
                 "script runs, numbers mean nothing")
  return p


CAPTION = ("Held-out true reward; win rate and KL(π‖π_dSFT) against the dSFT student; length. "
           "Mean ± population std (ddof=0) over seeds {seeds}; student d=32×1 layer, teacher "
           "d=128×3 layers; {epochs} epochs at lr {lr:g}, batch {batch_size}; wall time "
           "{minutes:.1f} min.")


def table(saved: dict, args) -> str:
  """The markdown table of a results.json (`saved`) written with these arguments."""
  return runs.markdown(ROWS, saved, CAPTION.format(**vars(args), minutes=saved["minutes"]))


def main():
  args = parser().parse_args()
  if args.quick:
    for k in GRIDS:
      GRIDS[k] = GRIDS[k][:1]
  t0 = time.time()
  seed_dir = lambda s: os.path.join(args.workdir, f"seed{s}")
  seeds = {args.seeds[0]: DistillSeed(seed_dir(args.seeds[0]), args.seeds[0], args)}
  chosen, grid_log = select(seeds[args.seeds[0]])
  results = {label: [] for label, _ in ROWS}
  for s in args.seeds:
    seed = seeds.get(s) or DistillSeed(seed_dir(s), s, args)
    for label, key in ROWS:
      name = key if key in ("teacher", "sft", "dsft") else seed.train(key, chosen[key])
      results[label].append(seed.evaluate(name, "eval", baseline="dsft"))
  saved = {"results": results, "chosen": chosen, "grid": grid_log,
           "minutes": (time.time() - t0) / 60}
  runs.write_results(args.workdir, saved, table(saved, args))
  plt = runs.pyplot()
  if plt is not None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    runs.bar_plots(axes, [label for label, _ in ROWS], results,
                   {"reward": "held-out true reward", "win_rate": "win rate vs dSFT"})
    fig.tight_layout()
    fig.savefig(os.path.join(args.workdir, "dadpo_table.png"), dpi=110)


if __name__ == "__main__":
  main()
