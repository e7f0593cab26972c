"""configs/paper/*: the 16 cells of Pre-DPO's Table 1 resolve with the paper's settings; their
runlocal forms run 2 steps per stage on local stand-ins (one cell per method)."""
import glob
import os

import numpy as np
import pytest

from dpo_jax import pipeline, train, writers
from helpers import REPO, config

CELLS = sorted(os.path.basename(p)[:-3]
               for p in glob.glob(os.path.join(REPO, "configs", "paper", "*__*.py")))

# Table 4 of arXiv 2504.15843, restated here independently of configs/paper/_table1.py:
# (DPO β, lr), (SimPO β, γ, lr), (Pre-DPO-with-DPO-guide β, lr), (Pre-DPO-with-SimPO-guide β, lr)
TABLE4 = {
    "llama32_3b_base": ((0.005, 1e-6), (2.5, 1.2, 1e-6), (0.05, 1e-6), (0.05, 6e-7)),
    "llama32_3b_instruct": ((0.05, 6e-7), (2.5, 1.0, 1e-6), (0.05, 1e-6), (0.1, 1e-6)),
    "qwen25_7b_base": ((0.005, 8e-7), (2.5, 1.4, 8e-7), (0.2, 8e-7), (0.2, 1e-6)),
    "qwen25_7b_instruct": ((0.01, 5e-7), (2.5, 1.2, 1e-6), (0.05, 1e-6), (0.1, 6e-7)),
}


def test_sixteen_cells():
  assert len(CELLS) == 16
  assert {c.split("__")[0] for c in CELLS} == set(TABLE4)
  assert {c.split("__")[1] for c in CELLS} == {"dpo", "simpo", "pre_dpo_dpo", "pre_dpo_simpo"}


@pytest.mark.parametrize("cell", CELLS)
def test_full_scale_settings(cell):
  row, method = cell.split("__")
  c = config(f"configs/paper/{cell}.py")
  dpo, simpo, pre_dpo, pre_simpo = TABLE4[row]
  assert c.batch_size == 128 and c.epochs == 1.0
  assert c.optim.warmup_ratio == 0.06 and c.optim.final_lr_ratio == 0.0
  assert c.data.max_length == 4096 and c.model.dtype == "bfloat16"
  assert ("Instruct" in c.model.init) == row.endswith("instruct")
  assert ("ultrafeedback" in c.data.train.lower())
  doc = open(os.path.join(REPO, "configs", "paper", cell + ".py")).read()
  assert "AlpacaEval 2 LC" in doc and "Arena-Hard" in doc and f"configs/paper/{cell}.py" in doc
  if method == "dpo":
    assert (c.loss.name, c.loss.beta, c.optim.lr) == ("dpo", *dpo)
    assert c.reference.mode == "initial"
  elif method == "simpo":
    assert (c.loss.name, c.loss.beta, c.loss.gamma, c.optim.lr) == ("simpo", *simpo)
    assert c.reference.mode == "none"
  else:
    beta, lr = pre_dpo if method == "pre_dpo_dpo" else pre_simpo
    assert (c.loss.name, c.loss.beta, c.optim.lr) == ("dpo", beta, lr)
    assert tuple(c.stage_order) == ("stage1", "stage2")
    guide = c.stages.stage1
    if method == "pre_dpo_dpo":
      assert (guide.loss.name, guide.loss.beta, guide.optim.lr) == ("dpo", *dpo)
    else:
      assert (guide.loss.name, guide.loss.beta, guide.loss.gamma, guide.optim.lr) == (
          "simpo", *simpo)
    assert c.stages.stage2.reference.mode == "checkpoint"


# One runlocal run per method, across both models and both base / instruct rows: the runlocal
# forms of one method's four cells differ only in Table 4's numbers (next test), so running the
# other twelve would repeat these programs with other constants.
RUNLOCAL = ("llama32_3b_base__dpo", "qwen25_7b_instruct__simpo",
            "llama32_3b_instruct__pre_dpo_dpo", "qwen25_7b_base__pre_dpo_simpo")
HYPERPARAMS = ("beta", "gamma", "lr")


def _flat(d, prefix=()):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flat(v, prefix + (k,))
    else:
      yield prefix + (k,), v


@pytest.mark.parametrize("method", ["dpo", "simpo", "pre_dpo_dpo", "pre_dpo_simpo"])
def test_runlocal_forms_of_a_method_differ_only_in_table4_numbers(method):
  cells = [c for c in CELLS if c.split("__")[1] == method]
  assert len(cells) == 4 and sum(c in RUNLOCAL for c in cells) == 1
  forms = [{k: v for k, v in _flat(config(f"configs/paper/{c}.py:runlocal").to_dict())
            if k[-1] not in HYPERPARAMS} for c in cells]
  for cell, form in zip(cells[1:], forms[1:]):
    assert form == forms[0], (cells[0], cell)
  for c in cells:   # ... which runlocal keeps from the full-scale config (checked above)
    hp = lambda spec: {k: v for k, v in _flat(config(spec).to_dict()) if k[-1] in HYPERPARAMS}
    assert hp(f"configs/paper/{c}.py:runlocal") == hp(f"configs/paper/{c}.py"), c


@pytest.mark.parametrize("cell", RUNLOCAL)
def test_runlocal_runs_two_steps(cell, tmp_path):
  c = config(f"configs/paper/{cell}.py:runlocal")
  if "stages" in c:
    results = pipeline.run(c, str(tmp_path))
    assert set(results) == {"stage1", "stage2"}
    dirs = [tmp_path / "stage1", tmp_path / "stage2"]
    # Stage 2 starts from the initial policy with the guide as reference: margins are not 0.
    start = np.load(tmp_path / "stage2" / "pairs_start.npz")
    assert np.abs(start["rewards_margins"]).max() > 0
    # A rerun under another learning rate is refused, not answered with the old results.
    other = config(f"configs/paper/{cell}.py:runlocal", optim__lr=1e-3)
    before = {d: (d / "metrics.jsonl").stat().st_mtime_ns for d in dirs}
    with pytest.raises(ValueError, match=r"stage2 was written by another config of this stage "
                       r"\(there vs now\): optim.lr: 1e-06 vs 0.001\. Rerun"):
      pipeline.run(other, str(tmp_path))   # stage 1 keeps its own lr: only stage 2 changed,
    assert before == {d: (d / "metrics.jsonl").stat().st_mtime_ns for d in dirs}   # none ran
  else:
    train.train_and_evaluate(c, str(tmp_path))
    dirs = [tmp_path]
  for d in dirs:
    rows = writers.read_metrics(d)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_a_bad_key_of_a_later_stage_is_named_before_the_first_stage_runs(tmp_path):
  c = config("configs/paper/llama32_3b_instruct__pre_dpo_dpo.py:runlocal")
  c.unlock()
  c.stages.stage2.reference.mdoe = "checkpoint"
  with pytest.raises(KeyError, match="config.stages.stage2.reference.mdoe: not a key"):
    pipeline.run(c, str(tmp_path))
  c.stages.stage2.reference = {"mode": "checkpoint", "path": "{workdir}/stage1"}
  c.stages.stage2.optim = {"lr": -1.0}
  with pytest.raises(ValueError, match="config.optim.lr=-1.0 must be > 0"):
    pipeline.run(c, str(tmp_path))
  assert not os.listdir(tmp_path)   # stage 1 never started
