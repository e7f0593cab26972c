"""Reference modes: initial, checkpoint (dpo_jax or HF), none, precomputed (cached), sync."""
import glob
import hashlib
import os
import shutil

import jax
import numpy as np
import pytest

from dpo_jax import build, export, reference, train
from dpo_jax.data.preference import Examples, Tokenized
from helpers import config, setup_holding

SMALL = dict(data__max_length=64, data__max_prompt_length=40, optim__lr=1e-2,
             optim__warmup_ratio=0.0, eval_every=0)


def run_steps(cfg, n, workdir=None):
  run = build.setup(cfg, workdir=None if workdir is None else str(workdir))
  step = run.jit_train_step()
  state, history = run.state, []
  for i in range(n):
    batch = build.to_device(train.microbatches(run.train_data(i), cfg.grad_accum), run)
    state, metrics = step(state, run.frozen, batch)
    history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    if run.reference.update is not None and (i + 1) % run.reference.every == 0:
      run.ref_params = run.reference.update(run.ref_params, state["params"])
  return history, state, run


def flops(run):
  batch = build.to_device(train.microbatches(run.train_data(0), 1), run)
  compiled = run.jit_train_step().lower(run.state, run.frozen, batch).compile()
  return compiled.cost_analysis()["flops"]


def test_precomputed_equals_initial_and_skips_reference_forward(tmp_path):
  initial, s1, run1 = run_steps(config(**SMALL), 3)
  pre, s2, run2 = run_steps(config(**SMALL, reference__mode="precomputed"), 3, tmp_path)
  assert run2.ref_params is None
  for a, b in zip(initial, pre):
    for k in ("loss", "rewards/margins", "rewards/chosen", "rewards/accuracies", "lambda"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               jax.device_get(s1["params"]), jax.device_get(s2["params"]))
  # No reference forward in the step: the policy forward+backward is ~3 forwards, +1 for ref.
  ratio = flops(run2) / flops(run1)
  assert ratio < 0.85, ratio


def test_precomputed_reference_holds_no_weights(tmp_path):
  """After its pass the precomputed mode keeps no reference weights (nor a copy made for the
  fingerprint); the initial mode keeps one copy of the policy's."""
  params = None
  for mode, copies in (("precomputed", 0), ("initial", 1)):
    run, held = setup_holding(config(**SMALL, reference__mode=mode), tmp_path)
    params = sum(x.nbytes for x in jax.tree.leaves(run.state["params"]))
    assert copies * params <= held < copies * params + params / 4, (mode, held, params)
    del run


def test_precomputed_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
  cfg = config(**SMALL, reference__mode="precomputed")
  build.setup(cfg, workdir=str(tmp_path))
  files = sorted(glob.glob(str(tmp_path / "ref_cache" / "*.npz")))
  assert [os.path.basename(f).split("-")[0] for f in files] == ["eval", "train"]

  def fail(*a, **k):
    raise AssertionError("cache should have been reused")
  with monkeypatch.context() as m:
    m.setattr(reference, "_precompute", fail)
    build.setup(cfg, workdir=str(tmp_path))   # same data, same reference: reused
    build.setup(config(**SMALL, reference__mode="precomputed", model__remat="none"),
                workdir=str(tmp_path))   # what a backward pass keeps: reused
    with pytest.raises(AssertionError, match="reused"):   # changed data: recomputed
      build.setup(config(**{**SMALL, "data__eval_fraction": 0.2},
                         reference__mode="precomputed"), workdir=str(tmp_path))
    with pytest.raises(AssertionError, match="reused"):   # changed reference weights
      build.setup(config(**SMALL, reference__mode="precomputed", seed=1),
                  workdir=str(tmp_path))
    with pytest.raises(AssertionError, match="reused"):   # the same weights used differently
      build.setup(config(**SMALL, reference__mode="precomputed", model__rope_theta=10.0),
                  workdir=str(tmp_path))
    with open(files[1], "wb") as f:   # an unreadable cache is computed again
      f.write(b"not an npz")
    with pytest.raises(AssertionError, match="reused"):
      build.setup(cfg, workdir=str(tmp_path))


def test_the_cache_key_of_the_examples_is_unchanged_by_holding_them_as_arrays():
  """fingerprint_examples hashes each example's prompt, chosen, rejected ids and 2 * label as
  int64 bytes, each followed by "|", as it did on lists, so caches written before still match."""
  rng = np.random.default_rng(0)
  ids = lambda: rng.integers(0, 100_000, rng.integers(1, 9)).tolist()   # noqa: E731
  for paired in (True, False):
    ex = [Tokenized(ids(), ids(), ids() if paired else None, float(i % 2)) for i in range(20)]
    h = hashlib.sha256()
    for e in ex:
      for part in (e.prompt, e.chosen, e.rejected or [], [int(e.label * 2)]):
        h.update(np.asarray(part, np.int64).tobytes() + b"|")
    assert reference.fingerprint_examples(ex) == h.hexdigest()
    assert reference.fingerprint_examples(Examples.of(ex)) == h.hexdigest()


def test_checkpoint_reference_from_orbax_and_hf(tmp_path):
  stage1 = config(**SMALL, steps=2, ckpt_every=2)
  stage1.unlock()
  stage1.progress = False
  train.train_and_evaluate(stage1, str(tmp_path / "stage1"))
  export.main(["--checkpoint", str(tmp_path / "stage1"), "--out", str(tmp_path / "hf")])
  results = {}
  for name, path in (("orbax", tmp_path / "stage1"), ("hf", tmp_path / "hf")):
    history, _, run = run_steps(config(**SMALL, reference__mode="checkpoint",
                                       reference__path=str(path)), 1)
    results[name] = history[0]
  # TR-DPO's moving copy starts from reference.path when it is set.
  history, _, run = run_steps(config(**SMALL, reference__mode="sync", reference__sync_every=4,
                                     reference__path=str(tmp_path / "hf")), 1)
  results["sync"] = history[0]
  # The reference is the stage-1 model, the policy the initial one: margins are not zero.
  assert abs(results["orbax"]["rewards/margins"]) > 1e-3
  for other in ("hf", "sync"):
    for k in ("loss", "rewards/margins", "rewards/chosen", "lambda"):
      np.testing.assert_allclose(results["orbax"][k], results[other][k], rtol=1e-6,
                                 err_msg=f"{other} {k}")
  # A path the mode would ignore is refused, not dropped.
  with pytest.raises(ValueError, match="config.reference.path=.* is set but "
                     "config.reference.mode='initial'"):
    build.setup(config(**SMALL, reference__path=str(tmp_path / "hf")))
  with pytest.raises(ValueError, match="config.reference.mode='none' runs no reference"):
    build.setup(config("configs/dpo.py:runlocal,loss=simpo", **SMALL,
                       reference__path=str(tmp_path / "hf")))
  # The reference reads the policy's ids: a tokenizer that encodes text otherwise, with the
  # same vocabulary size, is refused; a directory without tokenizer files cannot be checked.
  from helpers_hf import tiny_tokenizer   # noqa: PLC0415
  names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
  shutil.copytree(tmp_path / "hf", tmp_path / "bare",
                  ignore=lambda d, files: [f for f in files if f in names])
  shutil.copytree(tmp_path / "bare", tmp_path / "words")
  tiny_tokenizer(run.model_cfg.vocab_size).save_pretrained(tmp_path / "words")
  for mode in ("checkpoint", "sync", "precomputed"):
    with pytest.raises(ValueError, match=r"config.reference.path=.*words: its tokenizer "
                       r"encodes text differently from the policy's"):
      build.setup(config(**SMALL, reference__mode=mode, reference__path=str(tmp_path / "words")),
                  workdir=str(tmp_path / "w"))
  history, _, _ = run_steps(config(**SMALL, reference__mode="checkpoint",
                                   reference__path=str(tmp_path / "bare")), 1)
  np.testing.assert_allclose(history[0]["loss"], results["orbax"]["loss"], rtol=1e-6)


def test_reference_none_rejects_losses_that_need_one():
  with pytest.raises(ValueError, match="needs a reference model"):
    build.setup(config(**SMALL, reference__mode="none"))
  run = build.setup(config("configs/dpo.py:runlocal,loss=simpo", **SMALL))
  assert run.reference.mode == "none" and run.ref_params is None


def test_sync_reference_moves_towards_policy():
  cfg = config(**SMALL, reference__mode="sync", reference__sync_every=2,
               reference__sync_alpha=0.6)
  history, state, run = run_steps(cfg, 3)
  # Steps 1-2 with ref = θ0; after step 2, ref = 0.6 θ2 + 0.4 θ0. We rebuild θ2 by rerunning.
  _, state2, run2 = run_steps(cfg, 2)
  theta0 = jax.device_get(build.setup(cfg).state["params"])
  expected = jax.tree.map(lambda p, r: 0.6 * p + 0.4 * r, jax.device_get(state2["params"]),
                          theta0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               jax.device_get(run.ref_params), expected)
  assert history[0]["rewards/margins"] == 0.0 and history[2]["rewards/margins"] != 0.0


def test_a_bfloat16_reference_is_stored_in_bfloat16():
  """reference.dtype=bfloat16 halves the reference's weights and moves its log-probs by bf16
  rounding only. A moving (sync) reference is refused in bf16: its updates would round away."""
  (h32,), _, run32 = run_steps(config(**SMALL), 1)
  (h16,), _, run16 = run_steps(config(**SMALL, reference__dtype="bfloat16"), 1)
  assert {x.dtype for x in jax.tree.leaves(run16.ref_params)} == {np.dtype("bfloat16")}
  nbytes = lambda run: sum(x.nbytes for x in jax.tree.leaves(run.ref_params))
  assert 2 * nbytes(run16) == nbytes(run32)
  assert h32["rewards/chosen"] == 0.0 and h32["logps/chosen"] == h16["logps/chosen"]
  assert 0.0 < abs(h16["rewards/chosen"]) < 5e-3   # β · (bf16 rounding of ~50-nat log-probs)
  # a config check, so that a pipeline refuses it before its first stage runs
  with pytest.raises(ValueError, match="reference.dtype='bfloat16' with config.reference.mode="
                                       "'sync'.*rounded away"):
    build.check_config(config(**SMALL, reference__mode="sync", reference__dtype="bfloat16"))


@pytest.mark.parametrize("variant", [
    dict(loss="bco_pair"),                                       # loss state δ
    dict(loss="dpo", reference__mode="sync", reference__sync_every=1),   # moving reference
])
def test_resume_with_loss_state_and_moving_reference(tmp_path, variant):
  variant = dict(variant)
  loss = variant.pop("loss")
  cfg = config(f"configs/dpo.py:runlocal,loss={loss}", steps=4, log_every=1, ckpt_every=2,
               keep_checkpoints=4, eval_every=0, **variant)
  cfg.unlock()
  cfg.progress = False
  full, resumed = tmp_path / "full", tmp_path / "resumed"
  train.train_and_evaluate(cfg, str(full))
  train.train_and_evaluate(cfg, str(resumed))
  shutil.rmtree(resumed / "checkpoints" / "4")   # as if killed after the step-2 checkpoint
  train.train_and_evaluate(cfg, str(resumed))
  assert (full / "metrics.jsonl").read_text() == (resumed / "metrics.jsonl").read_text()
