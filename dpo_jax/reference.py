"""Reference modes: where r(y) = log π(y) − log π_ref(y) gets its second term.

Each mode is a (reference params, ref_logps_fn) pair chosen when the step is built; the step
calls `ref_logps_fn(ref_params, batch)` the same way for every mode, so nothing branches inside
it. The reference forward runs under stop_gradient: no activations are kept for the backward.

  initial     the starting policy (a frozen copy of the initial params)
  checkpoint  any dpo_jax Orbax checkpoint or Hugging Face directory (Pre-DPO's guide)
  none        reference-free losses (SimPO, CPO, ORPO): no reference forward at all
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dpo_jax.models import core, load, logprobs

MODES = ("initial", "checkpoint", "none")


def build(mode: str, path: str | None, spec, cfg, init_params, mesh, rules, *, dtype: str,
          chunk: int, stats: tuple[str, ...] = (), tokens: bool = False):
  """Returns (ref_params, ref_logps_fn)."""
  if mode not in MODES:
    raise ValueError(f"config.reference.mode must be one of {MODES}, got {mode!r}")
  if mode == "none":
    if spec.needs_ref:
      raise ValueError(f"config.loss.name={spec.name!r} needs a reference model but "
                       "config.reference.mode='none'")
    return None, lambda ref_params, batch: None
  if mode == "initial":
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), init_params)
    # A copy even at the same dtype: the policy's buffers are donated to the step.
    params = jax.tree.map(jnp.copy, params)
  else:
    if not path:
      raise ValueError("config.reference.path is required with config.reference.mode="
                       "'checkpoint'")
    ref_cfg = load.model_config(path, cfg, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    if ref_cfg.replace(**_numerics(cfg)) != cfg:
      raise ValueError(f"config.reference.path={path}: its architecture differs from the "
                       f"policy's ({ref_cfg} vs {cfg})")
    params = load.load_params(path, cfg, mesh, rules)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), params)
  graphdef = core.split(cfg)[0]

  def ref_logps(ref_params, batch):
    model = core.merge(graphdef, ref_params)
    return jax.lax.stop_gradient(
        logprobs.sequence_logps(model, batch, chunk=chunk, stats=stats, tokens=tokens))

  return params, ref_logps


def _numerics(cfg):
  return {k: getattr(cfg, k) for k in load.NUMERICS}
