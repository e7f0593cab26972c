"""The README's quoted files are the real ones, and its Quickstart has exactly two commands."""
import os
import re

from helpers import REPO


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
