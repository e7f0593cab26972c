"""Pre-DPO (Pan et al., 2025, arXiv 2504.15843) on the preference set shipped with the package.

Stage 1 trains the initial policy with DPO (reference = initial; `guide=dpo`) or SimPO
(`guide=simpo`, no reference) and saves it with Orbax. Stage 2 restarts from the SAME initial
policy and trains DPO on the same data with the stage-1 checkpoint restored as the reference
(resharded onto the current mesh). W/stage1 and W/stage2 each get metrics.jsonl, checkpoints and
pairs_start.npz (per-pair λ at their first step: ½ everywhere in stage 1 with DPO; spread by the
guide in stage 2).

    python -m dpo_jax.main --config configs/pre_dpo.py:guide=simpo --workdir /tmp/pre_dpo

Arguments: guide=dpo|simpo, runlocal.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import ml_collections  # noqa: E402

from dpo_jax import configlib  # noqa: E402


def get_config(arg=None):
  arg = configlib.parse_arg(arg, guide="dpo", runlocal=False)
  c = common.base_config()
  c.log_pair_metrics = 256
  common.set_loss(c, "dpo", beta=0.1)
  if arg.runlocal:
    c.steps, c.batch_size, c.log_every, c.eval_every, c.ckpt_every = 4, 8, 2, 4, 4
    c.log_pair_metrics = 16
  guide = ml_collections.ConfigDict()
  guide.loss = ml_collections.ConfigDict()
  if arg.guide == "simpo":
    common.set_loss(guide, "simpo", beta=2.0, gamma=0.5)   # sets guide.reference.mode = none
  elif arg.guide == "dpo":
    common.set_loss(guide, "dpo", beta=0.1)
  else:
    raise ValueError(f"guide must be dpo or simpo, got {arg.guide!r}")
  c.stages = ml_collections.ConfigDict()
  c.stages.stage1 = guide
  c.stages.stage2 = ml_collections.ConfigDict(
      {"reference": {"mode": "checkpoint", "path": "{workdir}/stage1"}})
  c.stage_order = ("stage1", "stage2")
  c.lock()
  return c
