"""Shared test helpers: configs resolved from configs/*.py in their runlocal form."""
import os

from dpo_jax import configlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(spec: str = "configs/dpo.py:runlocal", **overrides):
  """Loads a config file relative to the repo root; overrides use dotted keys with '__'."""
  return configlib.load(os.path.join(REPO, spec),
                        {k.replace("__", "."): v for k, v in overrides.items()})
