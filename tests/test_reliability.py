"""Interruption, checkpoints and numerics: SIGTERM / SIGKILL resume exactly, atomic and verified
checkpoints, NaN/Inf stop or skip, determinism, and CLI config errors naming the key."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dpo_jax import build, checkpoint, distributed, optim, train, writers
from helpers import REPO, config, xla_env

ENV = xla_env()
# Long enough to be interrupted mid-run; every step logged so that runs compare step by step.
STEPS = 24
FLAGS = ["--config.progress=False", f"--config.steps={STEPS}", "--config.log_every=1",
         "--config.eval_every=0", "--config.ckpt_every=8", "--config.keep_checkpoints=10"]


def cli(workdir, *extra):
  return [sys.executable, "-m", "dpo_jax.main", "--config", "configs/dpo.py:runlocal",
          "--workdir", str(workdir), *FLAGS, *extra]


def start(workdir):
  return subprocess.Popen(cli(workdir), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(workdir):
  out = subprocess.run(cli(workdir), cwd=REPO, env=ENV, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def logged_steps(workdir) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for line in f if line.endswith("\n"))


def wait_until(proc, condition, timeout=300):
  t0 = time.time()
  while not condition():
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() - t0 < timeout, "timed out waiting for the run"
    time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The reference: the same command, never interrupted (started at once, read when needed)."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  proc = start(workdir)
  done = {}

  def get():
    if not done:
      _, err = proc.communicate(timeout=600)
      assert proc.returncode == 0, err[-3000:]
      done["text"] = (workdir / "metrics.jsonl").read_text()
    return done["text"]
  yield get
  if proc.poll() is None:
    proc.kill()


def test_sigterm_saves_exits_cleanly_and_resumes_exactly(tmp_path, uninterrupted):
  workdir = tmp_path / "w"
  proc = start(workdir)
  wait_until(proc, lambda: logged_steps(workdir) >= 3)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "preempted: stopped by SIGTERM after step" in out
  stopped = int(out.split("after step ")[1].split(";")[0])
  assert 3 <= stopped < STEPS
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert steps[-1] == stopped   # the checkpoint of the step it stopped at
  assert logged_steps(workdir) == stopped
  finish(workdir)
  assert (workdir / "metrics.jsonl").read_text() == uninterrupted()


def test_a_signal_during_the_final_save_still_stops(tmp_path, monkeypatch):
  """SIGTERM after the last step's check (here during its save): the run is complete, and it
  still ends in Preempted, so that a pipeline does not start its next stage."""
  save = train.save_state

  def save_then_signal(mgr, run, state, step, *window):
    out = save(mgr, run, state, step, *window)
    if step == run.steps:
      os.kill(os.getpid(), signal.SIGTERM)
    return out
  monkeypatch.setattr(train, "save_state", save_then_signal)
  cfg = config(steps=2, log_every=1, eval_every=0, ckpt_every=1)
  cfg.unlock()
  cfg.progress = False
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(distributed.Preempted, match="SIGTERM after the last step 2; the run is "
                     "complete"):
    train.train_and_evaluate(cfg, str(tmp_path))
  assert [r["step"] for r in writers.read_metrics(tmp_path)] == [1, 2]
  assert signal.getsignal(signal.SIGTERM) == before   # the handler is given back


def test_sigkill_then_rerun_resumes_exactly(tmp_path, uninterrupted):
  """A hard kill (no chance to save) after the step-8 checkpoint: the rerun resumes from it,
  drops the metrics rows logged after it, and ends with an uninterrupted run's metrics."""
  workdir = tmp_path / "w"
  proc = start(workdir)
  wait_until(proc, lambda: logged_steps(workdir) >= 10
             and os.path.exists(workdir / "checkpoints" / "8" / checkpoint.MANIFEST))
  proc.kill()
  proc.communicate()
  assert logged_steps(workdir) >= 10
  finish(workdir)
  assert (workdir / "metrics.jsonl").read_text() == uninterrupted()


def test_interrupted_save_and_torn_metrics_line_leave_the_run_resumable(tmp_path):
  """A kill during a save leaves Orbax's temporary directory (never a half-written step) and
  possibly a metrics line cut short: the rerun resumes from the previous checkpoint and equals
  an uninterrupted run."""
  cfg = config(steps=6, log_every=1, eval_every=0, ckpt_every=3, keep_checkpoints=5)
  cfg.unlock()
  cfg.progress = False
  full, cut = tmp_path / "full", tmp_path / "cut"
  train.train_and_evaluate(cfg, str(full))
  train.train_and_evaluate(cfg, str(cut))
  ckpts = cut / "checkpoints"
  # What a kill during the step-6 save leaves behind: the step's temporary directory.
  os.rename(ckpts / "6", ckpts / "6.orbax-checkpoint-tmp-1234567")
  with open(ckpts / "6.orbax-checkpoint-tmp-1234567" / "params" / "junk", "wb") as f:
    f.write(b"\0" * 100)
  with open(cut / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "loss": 0.69')   # a torn line
  assert checkpoint.manager(str(ckpts)).latest_step() == 3
  train.train_and_evaluate(cfg, str(cut))
  assert (full / "metrics.jsonl").read_text() == (cut / "metrics.jsonl").read_text()


def _data_files(step_dir):
  return sorted(p for p in (step_dir / "params").rglob("*") if p.is_file()
                and p.stat().st_size > 64)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupted_checkpoint_is_detected(tmp_path, damage):
  cfg = config(steps=2, log_every=1, eval_every=0, ckpt_every=2)
  cfg.unlock()
  cfg.progress = False
  train.train_and_evaluate(cfg, str(tmp_path))
  step_dir = tmp_path / "checkpoints" / "2"
  target = _data_files(step_dir)[-1]
  data = target.read_bytes()
  if damage == "truncate":
    target.write_bytes(data[:len(data) // 2])
  elif damage == "flip":
    target.write_bytes(data[:-20] + bytes([data[-20] ^ 0xFF]) + data[-19:])
  else:
    target.unlink()
  pattern = {"truncate": "truncated", "flip": "CRC32", "delete": "missing"}[damage]
  run = build.setup(cfg)
  with pytest.raises(checkpoint.CheckpointError, match=pattern):   # resuming
    train.restore_state(checkpoint.manager(str(tmp_path / "checkpoints")), run, 2)
  with pytest.raises(checkpoint.CheckpointError, match=pattern):   # as a reference / init
    checkpoint.restore_params(str(tmp_path), jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        run.state["params"]))


def test_mismatching_checkpoint_names_the_field_and_parameter(tmp_path):
  cfg = config(steps=1, log_every=1, eval_every=0, ckpt_every=1)
  cfg.unlock()
  cfg.progress = False
  train.train_and_evaluate(cfg, str(tmp_path / "a"))
  f = cfg.model.intermediate_size
  wider = config(model__intermediate_size=2 * f, reference__mode="checkpoint",
                 reference__path=str(tmp_path / "a"))
  with pytest.raises(ValueError, match=rf"config.reference.path=.*intermediate_size: {f} vs "
                                       rf"{2 * f}"):
    build.setup(wider)
  # Below the config check: the stored tensors themselves, first mismatching one named.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          build.setup(config(model__intermediate_size=2 * f)).state["params"])
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"parameter \['layers'\]\['mlp'\]\['\w+_proj'\]\['kernel'\] has shape"):
    checkpoint.restore_params(str(tmp_path / "a"), abstract)


def test_resume_refuses_another_model_or_reference_mode(tmp_path):
  """Resuming checks more than the parameter shapes: a model that computes something else with
  the same shapes (rope_theta), another loss or reference, and a change to or from TR-DPO's
  saved reference are named; how the model computes (remat here) may change, and so may how
  the same reference is served (precomputed from the initial policy)."""
  def cfg(spec="configs/dpo.py:runlocal", **kw):
    c = config(spec, **{"steps": 2, "log_every": 1, "eval_every": 0, "ckpt_every": 1, **kw})
    c.unlock()
    c.progress = False
    return c
  for name, written in (("plain", cfg(steps=1)),
                        ("sync", cfg(steps=1, reference__mode="sync", reference__sync_every=1))):
    train.train_and_evaluate(written, str(tmp_path / name))
  with pytest.raises(checkpoint.CheckpointError, match=r"plain/checkpoints/1: written for "
                     r"another model .*rope_theta: 10000.0 vs 500000.0"):
    train.train_and_evaluate(cfg(model__rope_theta=5e5), str(tmp_path / "plain"))
  with pytest.raises(checkpoint.CheckpointError, match="reference.mode='sync' needs the moving "
                     "reference, but this checkpoint was written by another reference mode"):
    train.train_and_evaluate(cfg(reference__mode="sync"), str(tmp_path / "plain"))
  with pytest.raises(checkpoint.CheckpointError, match="holds TR-DPO's moving reference"):
    train.train_and_evaluate(cfg(), str(tmp_path / "sync"))
  guide = os.path.realpath(tmp_path / "sync")
  with pytest.raises(checkpoint.CheckpointError, match=r"plain/checkpoints/1: written for "
                     rf"another objective .*: the reference: 'the initial policy' vs '{guide}'"):
    train.train_and_evaluate(cfg(reference__mode="checkpoint", reference__path=guide),
                             str(tmp_path / "plain"))
  with pytest.raises(checkpoint.CheckpointError, match=r"loss.name: 'dpo' vs 'ipo'; resume"):
    train.train_and_evaluate(cfg("configs/dpo.py:runlocal,loss=ipo"), str(tmp_path / "plain"))
  with pytest.raises(checkpoint.CheckpointError, match=r"loss.name: 'dpo' vs 'simpo'; the "
                     "reference: 'the initial policy' vs 'none'"):
    train.train_and_evaluate(cfg("configs/dpo.py:runlocal,loss=simpo"), str(tmp_path / "plain"))
  assert [r["step"] for r in writers.read_metrics(tmp_path / "plain")] == [1]   # nothing lost
  train.train_and_evaluate(cfg(model__remat="none", reference__mode="precomputed"),
                           str(tmp_path / "plain"))
  assert [r["step"] for r in writers.read_metrics(tmp_path / "plain")] == [1, 2]


def _nan_config(policy, tmp_path, every=1):
  # lr 1e30: the first update is finite, every later forward overflows to NaN/Inf.
  cfg = config(steps=5, log_every=every, eval_every=0, ckpt_every=every, keep_checkpoints=10,
               optim__lr=1e30, optim__warmup_ratio=0.0, nonfinite=policy)
  cfg.unlock()
  cfg.progress = False
  return cfg


def test_nonfinite_step_stops_naming_step_and_metric(tmp_path):
  with pytest.raises(FloatingPointError, match=r"step 2: non-finite (loss|grad_norm) = (nan|inf)"
                     r".*last good checkpoint is step 1"):
    train.train_and_evaluate(_nan_config("stop", tmp_path), str(tmp_path))
  assert sorted(d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == ["1"]
  assert [r["step"] for r in writers.read_metrics(tmp_path)] == [1]


def test_nonfinite_between_log_points_is_caught_one_step_later(tmp_path):
  """Between log/checkpoint steps the flag is read one step late (no stall per step); the error
  still names the step that went bad, and nothing is saved or logged after it."""
  with pytest.raises(FloatingPointError, match=r"step 2: non-finite .*No checkpoint was written"):
    train.train_and_evaluate(_nan_config("stop", tmp_path, every=100), str(tmp_path))
  assert not [d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  assert not (tmp_path / "metrics.jsonl").exists() or writers.read_metrics(tmp_path) == []


def test_nonfinite_steps_can_be_skipped_and_counted(tmp_path, capsys):
  cfg = _nan_config("skip", tmp_path)
  last = train.train_and_evaluate(cfg, str(tmp_path))
  rows = writers.read_metrics(tmp_path)
  assert [r["nonfinite"] for r in rows] == [0.0, 1.0, 1.0, 1.0, 1.0]
  assert [r["skipped_steps"] for r in rows] == [0.0, 1.0, 2.0, 3.0, 4.0]
  train.print_summary(str(tmp_path), last)   # what dpo_jax.main prints at the end
  assert "4 steps skipped as non-finite" in capsys.readouterr().out
  # Skipped steps change nothing: the params after step 5 are those after step 1.
  run = build.setup(cfg)
  mgr = checkpoint.manager(str(tmp_path / "checkpoints"))
  p1 = jax.device_get(train.restore_state(mgr, run, 1)["params"])
  p5 = jax.device_get(train.restore_state(mgr, run, 5)["params"])
  jax.tree.map(np.testing.assert_array_equal, p1, p5)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(p5))
  # A skipped step does not advance optax's count, so the schedule stands still; the logged
  # learning rate is the one the next update would apply.
  opt_state = train.restore_state(mgr, run, 5)["opt_state"]
  assert {int(x) for x in jax.tree.leaves(opt_state) if np.ndim(x) == 0} == {1}
  _, schedule = optim.make_optimizer(cfg.optim, run.steps)
  np.testing.assert_allclose([r["learning_rate"] for r in rows],
                             [float(schedule(0))] + [float(schedule(1))] * 4, rtol=1e-6)
  assert float(schedule(1)) != float(schedule(2))
  # One row for the five steps: its means leave out the skipped steps (here: step 1's values).
  train.train_and_evaluate(_nan_config("skip", tmp_path, every=5), str(tmp_path / "one_row"))
  [row] = writers.read_metrics(tmp_path / "one_row")
  assert row["step"] == 5 and row["nonfinite"] == 1.0 and row["skipped_steps"] == 4.0
  for k in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
    assert np.isfinite(rows[0][k]) and row[k] == rows[0][k], k


def test_same_config_and_seed_give_identical_metrics(tmp_path):
  """...and rows come every log_every steps, evaluations every eval_every (a row of their own
  where log_every does not fall) and at the last step."""
  cfg = config(steps=5, log_every=2, eval_every=3)
  cfg.unlock()
  cfg.progress = False
  train.train_and_evaluate(cfg, str(tmp_path / "a"))
  train.train_and_evaluate(cfg, str(tmp_path / "b"))
  a, b = (tmp_path / "a" / "metrics.jsonl").read_text(), (tmp_path / "b" / "metrics.jsonl")
  assert a == b.read_text()
  rows = [json.loads(line) for line in a.splitlines()]
  assert [r["step"] for r in rows] == [2, 3, 4, 5]
  assert [r["step"] for r in rows if "eval/loss" in r] == [3, 5]


@pytest.mark.parametrize("flag,pattern", [
    ("--config.stepz=3", r"unknown config key in --config.stepz \('stepz'"),
    ("--config.trainng.lr=1", r"unknown config key in --config.trainng.lr \('trainng'"),
    ("--config.optim.lrr=0.1", r"unknown config key in --config.optim.lrr \('lrr'; Did you mean "
                               r"\"lr\""),
    ("--config.steps=abc", "steps"),
    ("--config.loss.name=dpoo", "dpoo.*known"),
    ("--config.nonfinite=ignore", "config.nonfinite"),
    ("--config.model.attention_impl=cudnn", r"model.attention_impl='cudnn' needs model.dtype"),
])
def test_cli_config_errors_name_the_key(tmp_path, flag, pattern):
  out = subprocess.run(
      [sys.executable, "-m", "dpo_jax.main", "--config", "configs/dpo.py:runlocal", "--workdir",
       str(tmp_path / "w"), "--config.progress=False", flag],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert re.search(pattern, out.stderr), out.stderr[-2000:]
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_config_file_setting_an_unknown_key_is_named(tmp_path):
  (tmp_path / "mine.py").write_text(
      f"import sys\nsys.path.insert(0, {str(REPO)!r})\nfrom configs import dpo\n\n\n"
      "def get_config(arg=None):\n  c = dpo.get_config('runlocal')\n"
      "  c.optim.learnig_rate = 1e-4\n  return c\n")
  out = subprocess.run(
      [sys.executable, "-m", "dpo_jax.main", "--config", str(tmp_path / "mine.py"), "--workdir",
       str(tmp_path / "w")], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert (f"unknown config key in the config file {tmp_path / 'mine.py'} "
          f"(Key \"learnig_rate\" does not exist") in out.stderr, out.stderr[-2000:]


def test_resume_with_an_incompatible_train_state_is_named(tmp_path):
  """The workdir was written by DPO (no loss state); resuming it as BCO (a running δ in the
  train state) is refused naming the loss, and below that check, restoring BCO's train state
  from it is a CheckpointError, not an Orbax tree dump."""
  cfg = config(steps=1, log_every=1, eval_every=0, ckpt_every=1)
  cfg.unlock()
  cfg.progress = False
  train.train_and_evaluate(cfg, str(tmp_path))
  other = config("configs/dpo.py:runlocal,loss=bco_pair", steps=2, log_every=1, eval_every=0)
  other.unlock()
  other.progress = False
  with pytest.raises(checkpoint.CheckpointError, match=r"/1: written for another objective .*"
                     r"loss.name: 'dpo' vs 'bco_pair'"):
    train.train_and_evaluate(other, str(tmp_path))
  run = build.setup(other)
  abstract = checkpoint.abstract_like(run.state, run.state_shardings)
  with pytest.raises(checkpoint.CheckpointError, match=r"/1: its train state .* does not match"):
    checkpoint.restore(checkpoint.manager(str(tmp_path / "checkpoints")), 1, abstract["params"],
                       {k: v for k, v in abstract.items() if k != "params"})
