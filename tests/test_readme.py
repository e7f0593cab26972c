"""The README's quoted files are the real ones, and its Quickstart has exactly two commands, the
first of which runs."""
import json
import os
import re
import subprocess
import sys

import numpy as np

from helpers import REPO, xla_env


def read(*parts):
  with open(os.path.join(REPO, *parts)) as f:
    return f.read()


def test_adding_a_loss_example_is_the_shipped_file():
  readme = read("README.md")
  assert read("dpo_jax", "losses", "dpo_shift.py") in readme
  assert read("tests", "test_dpo_shift.py") in readme


def test_quickstart_has_two_commands_and_ci_runs_the_test_command():
  readme = read("README.md")
  block = re.search(r"## Quickstart\s+```bash\n(.*?)```", readme, re.S).group(1)
  commands = [line for line in block.splitlines() if line.strip()]
  assert len(commands) == 2
  assert "dpo_jax.main" in commands[0]
  test_command = commands[1].split("&&")[-1].strip()
  assert test_command in read(".ci", "run")


def test_quickstart_job_runs_end_to_end_in_its_runlocal_form(tmp_path):
  """The Quickstart's first command with `:runlocal` appended (the same five stages at tiny
  sizes): task, SFT, sampled pairs labelled by the true reward, DPO from SFT, evaluation."""
  readme = read("README.md")
  block = re.search(r"## Quickstart\s+```bash\n(.*?)```", readme, re.S).group(1)
  job = block.splitlines()[0].split("&&")[-1].split()
  assert job[:5] == ["python", "-m", "dpo_jax.main", "--config", "configs/synthetic.py"]
  job = [sys.executable, *job[1:4], "configs/synthetic.py:runlocal", "--workdir", str(tmp_path)]
  out = subprocess.run(job, cwd=REPO, env=xla_env(1), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  stages = re.findall(r"^== stage (\w+):", out.stdout, re.M)
  assert stages == ["task", "sft", "pairs", "dpo", "evaluate"]
  with open(tmp_path / "pairs" / "pairs.jsonl") as f:
    pairs = [json.loads(line) for line in f]
  assert len(pairs) == 64 and all(p["chosen"] != p["rejected"] for p in pairs)
  with open(tmp_path / "evaluate" / "results.json") as f:
    result = json.load(f)["dpo"]
  assert result["samples"] == 16 * 2   # held-out prompts × samples each
  assert 0.0 <= result["win_rate"] <= 1.0
  assert all(np.isfinite(result[k]) for k in ("reward", "baseline_reward", "kl", "length"))
