"""Shared test helpers: configs resolved from configs/*.py in their runlocal form."""
import json
import os

from dpo_jax import configlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_env(devices: int = 8, **extra) -> dict:
  """This process's environment for a subprocess with `devices` fake CPU devices, keeping the
  suite's other XLA flags (conftest.py)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  return {**os.environ, "XLA_FLAGS": " ".join(flags), **extra}


def config(spec: str = "configs/dpo.py:runlocal", **overrides):
  """Loads a config file relative to the repo root; overrides use dotted keys with '__'."""
  return configlib.load(os.path.join(REPO, spec),
                        {k.replace("__", "."): v for k, v in overrides.items()})


def setup_holding(cfg, workdir):
  """(build.setup(cfg, workdir), bytes of the device arrays it created and holds beyond its
  train state), so that a test can show which weights a run keeps."""
  import gc   # noqa: PLC0415
  import jax   # noqa: PLC0415
  from dpo_jax import build   # noqa: PLC0415
  gc.collect()
  before = {id(x) for x in jax.live_arrays()}
  run = build.setup(cfg, workdir=str(workdir))
  gc.collect()
  kept = before | {id(x) for x in jax.tree.leaves(run.state)}
  return run, sum(x.nbytes for x in jax.live_arrays() if id(x) not in kept)


def unpaired_rows(path, n_pairs: int = 64) -> str:
  """The shipped pairs as unpaired (KTO) rows {prompt, completion, label}: chosen -> True,
  rejected -> False. Returns the path."""
  from dpo_jax.data.tiny_tasks import ASSET
  with open(ASSET) as f, open(path, "w") as out:
    for line in list(f)[:n_pairs]:
      row = json.loads(line)
      for text, label in ((row["chosen"], True), (row["rejected"], False)):
        out.write(json.dumps({"prompt": row["prompt"], "completion": text, "label": label})
                  + "\n")
  return str(path)
