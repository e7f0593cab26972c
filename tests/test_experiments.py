"""The experiment scripts (experiments/*_table.py): the tables committed in experiments/results
and README are what their results JSON gives, and each script still runs end to end (--quick:
tiny sizes and one grid point, for one seed) into a table that its own results.json rebuilds."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, xla_env

sys.path.insert(0, os.path.join(REPO, "experiments"))
import dadpo_table  # noqa: E402
import pre_dpo_table  # noqa: E402
import synthetic_runs  # noqa: E402

SCRIPTS = {"pre_dpo": pre_dpo_table, "dadpo": dadpo_table}


def default_args(module, *extra):
  return module.parser().parse_args(["--workdir", "unused", *extra])


@pytest.mark.parametrize("name", SCRIPTS)
def test_committed_tables_are_their_results_json(name):
  """README's table, caption included, is experiments/results' file, rebuilt from the JSON
  that the script wrote (its default arguments: seeds 0, 1, 2)."""
  module = SCRIPTS[name]
  with open(os.path.join(REPO, "experiments", "results", f"{name}_results.json")) as f:
    saved = json.load(f)
  table = module.table(saved, default_args(module))
  with open(os.path.join(REPO, "experiments", "results", f"{name}_table.md")) as f:
    assert f.read() == table
  with open(os.path.join(REPO, "README.md")) as f:
    assert table.strip() in f.read()
  # Each cell is the mean ± population std of the seeds' values.
  label, _ = module.ROWS[-1]
  reward = np.array([r["reward"] for r in saved["results"][label]])
  assert len(reward) == 3
  assert f"| {reward.mean():.3f} ± {reward.std():.3f} |" in table.splitlines()[-3]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_runs_end_to_end(name, tmp_path):
  module = SCRIPTS[name]
  out = subprocess.run(
      [sys.executable, os.path.join("experiments", f"{name}_table.py"), "--workdir",
       str(tmp_path), "--quick", "--seeds", "0"],
      cwd=REPO, env=xla_env(1), capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert list(saved["results"]) == [label for label, _ in module.ROWS]
  for label, runs in saved["results"].items():
    assert len(runs) == 1 and set(runs[0]) >= set(synthetic_runs.METRICS), label
    assert all(np.isfinite(runs[0][m]) for m in synthetic_runs.METRICS), label
  table = (tmp_path / "table.md").read_text()
  assert table == module.table(saved, default_args(module, "--seeds", "0"))
  assert table in out.stdout
  assert len([line for line in table.splitlines() if line.startswith("| ")]) == \
      1 + len(module.ROWS)
