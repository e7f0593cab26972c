"""Every registered loss trains through the real jit step (config.loss.name selects it)."""

import jax
import numpy as np
import pytest

from dpo_jax import build, losses, train
from helpers import config, unpaired_rows

TRL_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
             "logps/rejected", "logits/chosen", "logits/rejected", "lambda")
PAIRED_NAMES = ("rewards/accuracies",)
# daDPO's losses need a teacher model; tests/test_dadpo.py trains them with one.
IN_STEP = [n for n in losses.names() if not n.startswith("dadpo")] + [
    "wpo(simpo)", "ld(ipo)", "lcpo(hinge)", "sigmoid:0.8+bco_pair:0.2+sft:1.0"]


@pytest.fixture(scope="module")
def unpaired_jsonl(tmp_path_factory):
  return unpaired_rows(tmp_path_factory.mktemp("unpaired") / "rows.jsonl")


def train_two_steps(cfg):
  """(train state before, after, per-step metrics) of two steps on one device."""
  run = build.setup(cfg, devices=jax.devices()[:1])
  step = run.jit_train_step()
  state = run.state
  before = jax.device_get(state)
  history = []
  for i in range(2):
    batch = build.to_device(train.microbatches(run.train_data(i), cfg.grad_accum), run)
    state, metrics = step(state, run.frozen, batch)
    history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  return run, before, jax.device_get(state), history


@pytest.mark.parametrize("name", IN_STEP)
def test_loss_trains_in_step(name, unpaired_jsonl):
  spec = losses.get(name)
  # A smaller model on one device: this test is about the losses' wiring, and compiles 35 times.
  # Adam's eps at 1e-6 (not 1e-8) keeps f32 noise in near-zero gradients out of the comparison
  # of accumulated and whole-batch updates below.
  overrides = dict(data__max_length=64, data__max_prompt_length=40, data__eval_fraction=0.0,
                   optim__lr=1e-2, optim__eps=1e-6, optim__warmup_ratio=0.0, model__num_layers=1,
                   model__hidden_size=32, model__intermediate_size=64, batch_size=4)
  if spec.unpaired:
    overrides["data__train"] = unpaired_jsonl
  spec_name = f"configs/dpo.py:runlocal,loss={name}"
  run, before, after, history = train_two_steps(config(spec_name, **overrides))
  assert (run.ref_params is None) == (not spec.needs_ref)
  for m in history:
    assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
    for key in TRL_NAMES + (() if spec.unpaired else PAIRED_NAMES):
      assert key in m and np.isfinite(m[key]), key
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(before["params"]),
                                                          jax.tree.leaves(after["params"])))
  assert moved > 1e-4
  state0, now = before["loss_state"], after["loss_state"]
  if state0:   # stateful losses (BCO's δ, LCPO's η) carry their state in the train state
    assert any(not np.allclose(state0[k], now[k]) for k in state0), (state0, now)
    # evaluation reads the state and leaves it: a state metric (BCO's δ) is the stored value
    batch = build.to_device(train.microbatches(run.train_data(2), 1), run)
    _, (_, sums) = jax.jit(run.fns.eval_step)(after["params"], now, run.frozen, batch)
    shown = {k: float(num / den) for k, (num, den) in jax.device_get(sums).items() if k in now}
    assert shown == {k: float(now[k]) for k in shown}, (shown, now)
    assert shown or name.startswith("lcpo")   # LCPO reports its next η, not the state
  # Two micro-batches give the same two steps: batch-coupled losses take the whole-batch path;
  # unpaired rows' group means (NPO's too) are summed over micro-batches before dividing.
  if spec.batch_coupled or spec.unpaired:
    _, _, accumulated, history2 = train_two_steps(config(spec_name, **overrides, grad_accum=2))
    for a, b in zip(history, history2):
      for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5),
                 after, accumulated)
