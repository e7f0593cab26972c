"""Config helpers: typed `parse_arg` for structural choices, loading a config file by path.

Two override channels only (STYLE.md): `configs/x.py:model=qwen2,runlocal` for structure, and
`--config.key=value` for scalars; the returned ConfigDict is locked, so a typo is an error.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any

import ml_collections


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
  """'model=qwen2,runlocal' -> ConfigDict(model='qwen2', runlocal=True), typed by `spec`."""
  out = dict(spec)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in spec:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(spec)}")
    kind = type(spec[key])
    if kind is bool:
      if value and value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key!r} is a bool, got {value!r}")
      out[key] = value.lower() in ("", "true", "1")
    else:
      try:
        out[key] = kind(value)
      except ValueError:
        raise ValueError(f"config argument {key!r} must be {kind.__name__}, "
                         f"got {value!r}") from None
  return ml_collections.ConfigDict(out)


def load(spec: str, overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """Loads 'path/to/config.py[:arg]' and applies {'dotted.key': value} overrides."""
  path, _, arg = spec.partition(":")
  name = "dpo_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for key, value in (overrides or {}).items():
    set_key(config, key, value)
  return config


def set_key(config: ml_collections.ConfigDict, dotted: str, value: Any):
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    if p not in node:
      raise KeyError(f"unknown config key {dotted!r} (no {p!r})")
    node = node[p]
  if leaf not in node:
    raise KeyError(f"unknown config key {dotted!r}")
  node[leaf] = value


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parser for `app.run(main, flags_parser=configlib.parse_flags)`: an override of
  a key the config does not have (`--config.trainng.lr=1`) exits with a message naming the
  flag, instead of ml_collections' KeyError traceback."""
  from absl import flags   # noqa: PLC0415
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as e:
    exit_unknown_key(e, argv)


def exit_unknown_key(e: Exception, argv: list[str]):
  """Exits naming the flag (or config file) that set a key the config lacks (parse_flags; a
  config_dict flag with a default applies its overrides as it is defined)."""
  import sys   # noqa: PLC0415
  while e.args and isinstance(e.args[0], Exception):   # AttributeError(KeyError(...))
    e = e.args[0]
  detail = str(e.args[0] if e.args else e).replace("\n", "; ")
  name = detail.strip("'\"").split("'")[0]
  given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
  culprit = [a for a in given if name and f".{name}." in a + "."] or given
  if not culprit:   # the config file itself sets a key its base config lacks
    files = [a.split("=", 1)[1] if "=" in a else nxt for a, nxt in zip(argv, argv[1:] + [""])
             if a == "--config" or a.startswith("--config=")]
    culprit = [f"the config file {files[0]}" if files else "the config"]
  print(f"FATAL Flags parsing error: unknown config key in {', '.join(culprit)} ({detail})",
        file=sys.stderr)
  sys.exit(1)
