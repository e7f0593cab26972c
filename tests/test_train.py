"""The train step and loop: metrics, resume, sharding invariance, exact accumulation, compiles."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from dpo_jax import build, losses, train, writers
from dpo_jax.data import preference
from helpers import REPO, config, unpaired_rows, xla_env
from tensorboard.backend.event_processing import event_accumulator

TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")


def run_steps(cfg, n, devices=None):
  """Runs n steps with the jitted step; returns (per-step metrics, final params on host)."""
  run = build.setup(cfg, devices)
  step = run.jit_train_step()
  state, history = run.state, []
  for i in range(n):
    batch = build.to_device(train.microbatches(run.train_data(i), cfg.grad_accum), run)
    state, metrics = step(state, run.frozen, batch)
    history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  return history, jax.device_get(state["params"]), run


def test_main_cli_end_to_end(tmp_path):
  """`python -m dpo_jax.main` writes metrics.jsonl, TensorBoard events and checkpoints, and a
  second identical command resumes (here: finds the run complete and changes nothing)."""
  workdir = tmp_path / "w"
  cmd = [sys.executable, "-m", "dpo_jax.main", "--config", "configs/dpo.py:runlocal",
         "--workdir", str(workdir), "--config.progress=False", "--config.steps=4"]
  env = xla_env()
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "held-out:" in out.stdout and "checkpoints:" in out.stdout
  rows = writers.read_metrics(workdir)
  assert [r["step"] for r in rows] == [2, 4]
  for key in ("step", "loss", "grad_norm", "learning_rate", "lambda", *TRL_METRICS):
    assert key in rows[-1], key
  assert "eval/rewards/accuracies" in rows[-1]
  # TensorBoard's own reader (it checks every record's CRC) sees every logged value, and the
  # step time, which metrics.jsonl leaves out.
  scalars = tensorboard_scalars(workdir / "tensorboard")
  step_s = scalars.pop("perf/step_s")   # from the steps after the first (compiling) ones
  assert step_s and all(step in (2, 4) and t > 0 for step, t in step_s)
  assert scalars == {k: [(r["step"], np.float32(r[k])) for r in rows if k in r]
                     for k in {k for r in rows for k in r if k != "step"}}
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  before = (workdir / "metrics.jsonl").read_text()
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert (workdir / "metrics.jsonl").read_text() == before


def tensorboard_scalars(directory) -> dict:
  """{tag: [(step, value)]} as TensorBoard shows them."""
  acc = event_accumulator.EventAccumulator(str(directory))
  acc.Reload()
  return {tag: [(e.step, np.float32(e.value)) for e in acc.Scalars(tag)]
          for tag in acc.Tags()["scalars"]}


def test_tensorboard_drops_the_steps_a_resumed_run_logs_again(tmp_path):
  """A writer started after step 3 (a resume) makes TensorBoard drop the earlier file's steps
  4-5, which the resumed run logs again, as metrics.jsonl drops them."""
  w = writers.MetricsWriter(str(tmp_path), 0)
  for step in range(1, 6):
    w.write(step, {"loss": float(step), "accuracy": 0.5}, {"perf/step_s": 0.1})
  w.close()
  w = writers.MetricsWriter(str(tmp_path), 3)
  for step in range(4, 7):
    w.write(step, {"loss": 10.0 * step, "accuracy": 0.25, "nan": float("nan"),
                   "huge": 1e39})   # finite in float64; TensorBoard's float32 holds inf
  w.close()
  assert len(os.listdir(tmp_path / "tensorboard")) == 2
  assert tensorboard_scalars(tmp_path / "tensorboard") == {
      "loss": [(1, 1), (2, 2), (3, 3), (4, 40), (5, 50), (6, 60)],
      "accuracy": [(1, 0.5), (2, 0.5), (3, 0.5), (4, 0.25), (5, 0.25), (6, 0.25)],
      "perf/step_s": [(1, np.float32(0.1)), (2, np.float32(0.1)), (3, np.float32(0.1))],
      "huge": [(4, np.inf), (5, np.inf), (6, np.inf)]}
  assert [r["loss"] for r in writers.read_metrics(str(tmp_path))] == [1, 2, 3, 40, 50, 60]
  # TFRecord's checksum: CRC-32C's check value (the CRC catalogue's "123456789").
  assert writers.crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize("log_every,eval_every,rows", [(1, 3, [1, 2, 3, 4, 5, 6]), (4, 0, [4, 6])])
def test_resume_reproduces_uninterrupted_run(tmp_path, log_every, eval_every, rows):
  """With log_every=4 the step-3 checkpoint falls inside a row's window: the means of steps 1-3
  so far come back from its metadata, so the row at step 4 still averages steps 1-4."""
  cfg = config(steps=6, log_every=log_every, eval_every=eval_every, ckpt_every=3,
               keep_checkpoints=5)
  cfg.unlock()
  cfg.progress = False
  full, resumed = tmp_path / "full", tmp_path / "resumed"
  train.train_and_evaluate(cfg, str(full))
  train.train_and_evaluate(cfg, str(resumed))
  # Crash after the step-3 checkpoint: later checkpoints lost, metrics rows beyond it written.
  shutil.rmtree(resumed / "checkpoints" / "6")
  train.train_and_evaluate(cfg, str(resumed))
  assert (full / "metrics.jsonl").read_text() == (resumed / "metrics.jsonl").read_text()
  assert [r["step"] for r in writers.read_metrics(resumed)] == rows


def test_a_row_holds_the_means_of_the_steps_since_the_row_before(tmp_path):
  """log_every=3 against the same run logging every step: each row's training metrics are the
  means over its three steps (as TRL logs them); learning_rate, nonfinite, skipped_steps and
  the loss state (BCO's running δ and its count) are the row's own step's."""
  rows = {}
  for every in (1, 3):
    cfg = config(steps=6, log_every=every, eval_every=0, ckpt_every=0, loss__name="bco")
    cfg.unlock()
    cfg.progress = False
    train.train_and_evaluate(cfg, str(tmp_path / str(every)))
    rows[every] = writers.read_metrics(tmp_path / str(every))
  each, averaged = rows[1], rows[3]
  assert [r["step"] for r in averaged] == [3, 6]
  for row, steps in zip(averaged, (each[:3], each[3:])):
    assert row.keys() == steps[-1].keys()
    for k in row.keys() - {"step", "epoch"}:
      at_step = k in writers.MetricsWindow.AT_STEP + ("delta", "delta_count")
      want = steps[-1][k] if at_step else np.mean([s[k] for s in steps])
      np.testing.assert_allclose(row[k], want, rtol=1e-6, atol=1e-9, err_msg=k)
    assert row["loss"] != steps[-1]["loss"]
    assert steps[0]["delta_count"] < steps[-1]["delta_count"]


def test_a_scratch_qwen2_resumes_and_exports(tmp_path):
  """model.family=qwen2 from scratch has Qwen2's q/k/v biases, so its checkpoint's config is
  the model it trained (resume), and transformers reads the export as that model. An export
  carries the generation config of the HF directory its run started from."""
  from dpo_jax import export   # noqa: PLC0415
  from dpo_jax.models import hf_io   # noqa: PLC0415
  cfg = config(steps=1, log_every=1, eval_every=0, ckpt_every=1, model__family="qwen2")
  cfg.unlock()
  cfg.progress = False
  train.train_and_evaluate(cfg, str(tmp_path / "w"))
  cfg.steps = 2
  train.train_and_evaluate(cfg, str(tmp_path / "w"))
  assert [r["step"] for r in writers.read_metrics(tmp_path / "w")] == [1, 2]
  export.main(["--checkpoint", str(tmp_path / "w"), "--out", str(tmp_path / "hf")])
  got, params = hf_io.load_hf(str(tmp_path / "hf"))
  assert got.family == "qwen2" and "bias" in params["layers"]["self_attn"]["q_proj"]
  # A run from an HF directory exports that directory's generation config (sampling defaults,
  # every stop id), with config.json's ids where it has none.
  source = {"eos_token_id": [got.eos_token_id, 7], "temperature": 0.6, "do_sample": True}
  (tmp_path / "hf" / "generation_config.json").write_text(json.dumps(source))
  cfg.steps, cfg.model.init = 1, str(tmp_path / "hf")
  train.train_and_evaluate(cfg, str(tmp_path / "w2"))
  export.main(["--checkpoint", str(tmp_path / "w2"), "--out", str(tmp_path / "hf2")])
  gen = json.loads((tmp_path / "hf2" / "generation_config.json").read_text())
  ids = {k: getattr(got, k) for k in ("bos_token_id", "pad_token_id")}
  assert gen == {**{k: v for k, v in ids.items() if v is not None}, **source}
  export.main(["--checkpoint", str(tmp_path / "w"), "--out", str(tmp_path / "hf2")])   # no ids
  assert not (tmp_path / "hf2" / "generation_config.json").exists()   # none left from before


def test_first_step_reference_equals_policy():
  history, _, run = run_steps(config(), 2)
  first = history[0]
  # ref = initial policy: every implicit reward is exactly zero before the first update.
  assert first["rewards/margins"] == 0.0 and first["rewards/chosen"] == 0.0
  assert first["lambda"] == pytest.approx(0.5)
  assert first["loss"] == pytest.approx(np.log(2), abs=1e-6)
  assert history[1]["rewards/margins"] != 0.0
  for key in (*TRL_METRICS, "grad_norm", "learning_rate", "lambda", "loss"):
    assert np.isfinite(first[key]), key


# Adam's first update is ≈ lr·sign(g) wherever |g| >> eps, so f32 reduction-order noise in
# near-zero gradients (different on each mesh) would become ±lr parameter differences. A larger
# eps (1e-6) bounds that amplification; the comparison is then a statement about the step.
MESH_OPTIM = dict(optim__lr=1e-3, optim__eps=1e-6)


_ONE_DEVICE = {}


@pytest.mark.parametrize("loss", ["dpo", "aot", "kto"])
@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 2, 2), (1, 4, 2), (1, 8, 1)])
def test_sharded_step_equals_single_device(mesh, loss, tmp_path_factory):
  """dpo, aot (a sort over the whole batch) and kto (a batch-level KL reference point) give the
  same metrics and updated params on every mesh as on one device."""
  extra = {}
  if loss == "kto":
    extra["data__train"] = unpaired_rows(tmp_path_factory.mktemp("kto") / "rows.jsonl", 96)
  spec = f"configs/dpo.py:runlocal,loss={loss}"
  if loss not in _ONE_DEVICE:
    _ONE_DEVICE[loss] = run_steps(config(spec, **MESH_OPTIM, **extra), 2,
                                  devices=jax.devices()[:1])[:2]
  one, p_one = _ONE_DEVICE[loss]
  d, f, t = mesh
  cfg = config(spec, **MESH_OPTIM, **extra, mesh__data=d, mesh__fsdp=f, mesh__tensor=t)
  many, p_many, run = run_steps(cfg, 2)
  assert dict(run.mesh.shape) == {"data": d, "fsdp": f, "tensor": t}
  assert run.spec.name == loss
  for a, b in zip(one, many):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               p_one, p_many)


@pytest.mark.parametrize("loss", ["dpo", "aot", "kto"])
def test_gradient_accumulation_is_exact(loss, tmp_path):
  """k micro-batches give the update and metrics of one batch k times larger: dpo sums
  independent pairs; aot (a sort over the whole batch) and kto (a batch-level KL reference point)
  are batch-coupled and take the whole-batch path (their per-micro-batch statistics differ)."""
  extra = {}
  if loss == "kto":
    extra["data__train"] = unpaired_rows(tmp_path / "rows.jsonl", 96)
  spec = f"configs/dpo.py:runlocal,loss={loss}"
  h1, p1, run = run_steps(config(spec, **MESH_OPTIM, **extra, grad_accum=1), 2)
  assert run.spec.batch_coupled == (loss != "dpo")
  accumulated = [run_steps(config(spec, **MESH_OPTIM, **extra, grad_accum=k, mesh__data=8 // k,
                                  mesh__tensor=k), 2)[:2] for k in (2, 4)]
  for hist, params in accumulated:
    for a, b in zip(h1, hist):
      for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), p1,
                 params)


def test_merge_rows_undoes_microbatches():
  """The whole-batch path reassembles micro-batches in the batch's own order."""
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, 9, (12, 5)), "valid": rng.random(6), "label": rng.random(6)}
  for k in (1, 2, 3):
    mb = train.microbatches(batch, k)
    np.testing.assert_array_equal(train.merge_rows(mb["tokens"]), batch["tokens"])
    np.testing.assert_array_equal(train.merge_pairs(mb["valid"]), batch["valid"])


def test_mallows_reference_entropy_is_the_mean_of_the_two_completion_means():
  """MallowsPO's H̄_ref(x): each completion's mean token entropy, averaged over the pair, / log V
  (not the pooled token mean, which weights the longer completion more)."""
  lens = np.array([10.0, 3.0, 100.0, 5.0], np.float32)        # chosen 10, 3; rejected 100, 5
  ent_sum = np.array([2.0, 1.5, 80.0, 0.5], np.float32)       # Σ_t H_t per sequence
  pol = {"logps": -lens, "lens": lens}
  ref = {"logps": -lens, "entropy": ent_sum}
  batch = {"valid": np.ones(2, np.float32), "label": np.ones(2, np.float32)}
  logps = train.pair_logps(losses.get("mallows"), pol, ref, batch, vocab_size=64)
  want = (np.array([0.2, 0.5]) + np.array([0.8, 0.1])) / 2 / np.log(64)
  np.testing.assert_allclose(logps.extra["ref_entropy"], want, rtol=1e-6)


def test_step_compiles_once_per_bucket():
  cfg = config(batch_size=8, data__max_length=128, data__buckets=(36, 42, 48, 128))
  run = build.setup(cfg)
  step = run.jit_train_step()
  state, shapes = run.state, set()
  for i in range(12):
    batch_np = train.microbatches(run.train_data(i), 1)
    shapes.add(batch_np["tokens"].shape[-1])
    state, _ = step(state, run.frozen, build.to_device(batch_np, run))
  assert shapes <= {36, 42, 48, 128} and len(shapes) == 3
  assert step._cache_size() == len(shapes)


def test_batch_signature_changes_exactly_when_the_step_compiles():
  """Packed rows of one shape can score a different number of positions (score_index): the
  loop's steady-state timing must count such a batch as compiling. batch_signature names one
  jitted program per distinct value, no more and no fewer."""
  cfg = config(batch_size=8, data__packing=True)
  run = build.setup(cfg)
  batches = [train.train_batch(run.train_data, i, 1) for i in range(40)]
  sigs = [train.batch_signature(b) for b in batches]
  # The first prefix in which two batches share the tokens' shape but not the signature.
  n = next(i + 1 for i in range(len(batches))
           if len(set(sigs[:i + 1])) > len({b["tokens"].shape for b in batches[:i + 1]}))
  step = run.jit_train_step()
  state = run.state
  for i in range(n):
    state, _ = step(state, run.frozen, build.to_device(batches[i], run))
    assert step._cache_size() == len(set(sigs[:i + 1])), i


def test_bad_config_keys_are_named():
  with pytest.raises(ValueError, match="config.loss.gamma"):
    build.setup(_with_loss_key("gamma", 0.5))
  with pytest.raises(ValueError, match="config.mesh"):
    build.setup(config(mesh__data=3))
  with pytest.raises(ValueError, match="divisible"):
    build.setup(config(batch_size=4))
  # A wrapper's flags come from its base: another base is named as the bound loss, whose
  # flags (daDPO's teacher) and hyperparameters the step then reads.
  with pytest.raises(ValueError, match=r"config.loss.base='dadpo'.*name='lcpo\(dadpo\)'"):
    build.setup(config("configs/dpo.py:runlocal,loss=lcpo", loss__base="dadpo"))
  assert build.loss_hparams(config("configs/dpo.py:runlocal,loss=lcpo(simpo)").loss,
                            losses.get("lcpo(simpo)"))["base"] == "simpo"


@pytest.mark.parametrize("key,value", [
    ("keep_checkpoints", 0), ("grad_accum", 0), ("data.eval_fraction", -0.1),
    ("data.eval_fraction", 1.0), ("optim.lr", -0.01), ("optim.warmup_ratio", 1.5),
    ("epochs", -1.0), ("loss.beta", 0.0), ("loss.beta", -0.1)])
def test_settings_that_would_train_the_wrong_thing_are_named(key, value):
  """Each of these used to run to the end: no checkpoint kept, the split flipped, gradient
  ascent, the rejected answers preferred."""
  with pytest.raises(ValueError, match=f"config.{key}={value}"):
    build.setup(config(**{key.replace(".", "__"): value}))


def test_label_smoothing_past_one_half_is_named():
  with pytest.raises(ValueError, match="config.loss.label_smoothing=1.5"):
    build.setup(config("configs/dpo.py:runlocal,loss=cdpo", loss__label_smoothing=1.5))


def test_a_vocabulary_smaller_than_the_data_is_named(tmp_path):
  """The byte tokenizer's ids reach past 100: named before the first step, not a NaN loss."""
  with pytest.raises(ValueError, match="config.model.vocab_size=100 .* at least"):
    train.train_and_evaluate(config(model__vocab_size=100), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_skipped_rows_are_reported(tmp_path, capsys):
  from dpo_jax.data.tiny_tasks import ASSET
  rows = open(ASSET).read().splitlines()[:80]
  path = tmp_path / "rows.jsonl"
  path.write_text("\n".join(rows[:5] + ["{not json"] + rows[5:]) + "\n")
  run = build.setup(config(data__train=str(path), data__on_error="skip"))
  assert len(run.train_data.examples) + len(run.eval_examples) == 80
  assert "config.data.on_error='skip': 1 rows of" in capsys.readouterr().err


def test_a_separate_eval_source_and_its_split(tmp_path):
  """config.data.eval is held out whole (its rows, none of train's); a split asked of an eval
  file without splits is named rather than read as every row."""
  from dpo_jax.data.tiny_tasks import ASSET
  rows = open(ASSET).read().splitlines()
  (tmp_path / "train.jsonl").write_text("\n".join(rows[:40]) + "\n")
  (tmp_path / "eval.jsonl").write_text("\n".join(rows[40:52]) + "\n")
  run = build.setup(config(data__train=str(tmp_path / "train.jsonl"),
                           data__eval=str(tmp_path / "eval.jsonl")))
  assert len(run.train_data.examples) == 40 and len(run.eval_examples) == 12
  with pytest.raises(preference.DataError, match=r"eval.jsonl: has no splits .*'test'"):
    build.setup(config(data__train=str(tmp_path / "train.jsonl"),
                       data__eval=str(tmp_path / "eval.jsonl"), data__eval_split="test"))


def test_data_add_bos_false_starts_string_rows_with_their_text():
  from dpo_jax.data.tokenizer import byte_tokenizer
  tok = byte_tokenizer()
  for add in (True, False):
    train_data, held_out, _ = build.load_data(config(data__add_bos=add), tok, tok.pad_token_id)
    firsts = {e.prompt[0] for e in held_out} | {train_data.examples[0].prompt[0]}
    assert (firsts == {tok.bos_token_id}) if add else (tok.bos_token_id not in firsts)


def test_a_hub_model_id_is_fetched_once_and_loaded(tmp_path, monkeypatch):
  """model.init="org/name" (no such local path) is fetched with huggingface_hub into its cache
  (here a stand-in that returns a local directory: tests never download) and loads as that
  directory; a failed fetch names the id."""
  import huggingface_hub   # noqa: PLC0415
  from dpo_jax.data.tokenizer import byte_tokenizer   # noqa: PLC0415
  from dpo_jax.models import hf_io, load   # noqa: PLC0415
  from helpers_hf import tiny_hf_model   # noqa: PLC0415
  tiny_hf_model("llama", vocab_size=len(byte_tokenizer())).save_pretrained(tmp_path / "snap")
  byte_tokenizer().save_pretrained(tmp_path / "snap")
  calls = []
  monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: calls.append(
      (repo_id, kw)) or str(tmp_path / "snap"))
  load._fetch.cache_clear()
  run = build.setup(config(model__init="some-org/tiny-llama"))
  assert [c[0] for c in calls] == ["some-org/tiny-llama"]   # one fetch for config, weights
  assert "*.safetensors" in calls[0][1]["allow_patterns"]   # and tokenizer
  want = hf_io.load_hf(str(tmp_path / "snap"))[1]
  for a, b in zip(jax.tree.leaves(jax.device_get(run.state["params"])), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)

  def offline(repo_id, **kw):
    raise OSError("offline")
  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  with pytest.raises(FileNotFoundError, match=r"other-org/x: no such local path, and as a "
                     r"Hugging Face hub model id it could not be fetched \(OSError: offline\)"):
    build.setup(config(model__init="other-org/x"))
  load._fetch.cache_clear()


def _with_loss_key(key, value):
  cfg = config()
  cfg.unlock()
  cfg.loss[key] = value
  return cfg


def test_a_rerun_reads_the_tokenised_data_from_the_cache(tmp_path, monkeypatch):
  """W/data_cache holds the tokenised rows: the same job set up again (a resume) tokenises
  nothing and gets the same examples; data.cache=False tokenises."""
  cfg = config(eval_every=0)
  first = build.setup(cfg, workdir=str(tmp_path))
  assert len(os.listdir(tmp_path / "data_cache")) == 1

  def tokenise(*args, **kwargs):
    raise AssertionError("tokenised again")
  monkeypatch.setattr(preference, "tokenize_rows", tokenise)
  again = build.setup(cfg, workdir=str(tmp_path))
  assert again.train_data.examples == first.train_data.examples
  assert again.eval_examples == first.eval_examples and len(first.eval_examples) > 0
  # the hold-out split is two views of the ids mapped from the cache file: nothing copied
  assert again.train_data.examples.tokens is again.eval_examples.tokens
  assert isinstance(again.eval_examples.tokens.base, np.memmap)
  with pytest.raises(AssertionError, match="tokenised again"):
    build.setup(config(eval_every=0, data__cache=False), workdir=str(tmp_path))
  with pytest.raises(ValueError, match=r"config.data.cache_keep=-1 must be an integer >= 0"):
    build.setup(config(eval_every=0, data__cache_keep=-1), workdir=str(tmp_path))


def test_truncation_is_reported_per_file(tmp_path, capsys):
  """Training says, per data file, how many examples truncation cut and what it cut; nothing
  when it cut none."""
  tok = train.load.load_tokenizer(config().model.init)
  pad = preference.pad_id(tok)
  train_rows = [{"prompt": "x " * 40, "chosen": "a", "rejected": "b"},
                {"prompt": "Hi.", "chosen": "a", "rejected": "b"},
                {"prompt": "x " * 40, "chosen": "a " * 40, "rejected": "b"}]
  eval_rows = [{"prompt": "Hi.", "chosen": "a " * 40, "rejected": "b"},
               {"prompt": "Hi.", "chosen": "a", "rejected": "b"}]
  paths = []
  for name, rows in (("train", train_rows), ("eval", eval_rows)):
    paths.append(tmp_path / f"{name}.jsonl")
    paths[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfg = config(data__train=str(paths[0]), data__eval=str(paths[1]), data__max_length=32,
               data__max_prompt_length=16, data__cache=False, batch_size=2)
  build.load_data(cfg, tok, pad)
  err = capsys.readouterr().err
  assert (f"{paths[0]}: truncation cut 2 of 3 examples (max_length=32, max_prompt_length=16, "
          "keep_end): the prompt of 2, the chosen completion of 1") in err
  assert (f"{paths[1]}: truncation cut 1 of 2 examples (max_length=32, max_prompt_length=16, "
          "keep_end): the chosen completion of 1") in err
  build.load_data(config(data__train=str(paths[0]), data__eval=str(paths[1]), data__cache=False,
                         data__max_length=512, data__max_prompt_length=256, batch_size=2),
                  tok, pad)
  assert "truncation" not in capsys.readouterr().err


def test_streamed_data_give_the_same_batches(tmp_path, monkeypatch, capsys):
  """data.streaming=True reads a parquet file as a stream (datasets.IterableDataset, a round of
  rows at a time) and trains on the same examples and held-out split as reading it whole; a
  stream has no fingerprint, so nothing is cached, and the log says so."""
  import datasets   # noqa: PLC0415
  from dpo_jax.data.tiny_tasks import ASSET   # noqa: PLC0415
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
  data = str(tmp_path / "d.parquet")
  datasets.Dataset.from_json(ASSET).to_parquet(data)
  tok = train.load.load_tokenizer(config().model.init)
  pad = preference.pad_id(tok)

  def load(streaming):
    cfg = config(data__train=data, data__streaming=streaming)
    return build.load_data(cfg, tok, pad, str(tmp_path / f"w{streaming}"))
  whole, streamed = load(False), load(True)
  assert isinstance(preference.load_rows(data, streaming=True)[1], preference._Stream)
  assert streamed[0].examples == whole[0].examples and streamed[1] == whole[1]
  assert len(streamed[1]) > 0 and streamed[2] == whole[2] == 0
  assert not (tmp_path / "wTrue" / "data_cache").exists()
  assert "not kept in" in capsys.readouterr().err
  assert len(os.listdir(tmp_path / "wFalse" / "data_cache")) == 1


def test_unpaired_metrics_are_group_means_whatever_the_batching(tmp_path):
  """KTO's rewards/* and logps/* are TRL's KTOTrainer's: means over the desirable ("chosen") and
  undesirable ("rejected") rows of all the rows evaluated, whatever the eval batch size (a
  short last batch, a batch without one of the groups); margins = chosen − rejected."""
  from dpo_jax.models import core   # noqa: PLC0415
  rows = unpaired_rows(tmp_path / "rows.jsonl", 48)
  cfg = config("configs/dpo.py:runlocal,loss=kto", data__train=rows, data__eval_fraction=0.25,
               batch_size=8, optim__lr=1e-2, optim__warmup_ratio=0.0)
  run = build.setup(cfg)
  step, state = run.jit_train_step(), run.state
  for i in range(2):   # a policy that differs from the reference
    state, _ = step(state, run.frozen, build.to_device(train.microbatches(run.train_data(i), 1),
                                                       run))
  eval_jit = jax.jit(run.fns.eval_step)
  labels = np.array([e.label for e in run.eval_examples])
  assert len(labels) % 5 and 0 < labels.sum() < len(labels)
  got = []
  for bs in (1, 5, len(labels)):   # one group per batch; a short last batch; all at once
    run.config.unlock()
    run.config.eval_batch_size = bs
    got.append(train.evaluate(run, eval_jit, state))
  per_row = [k for k in got[0] if k.split("/")[1] in ("rewards", "logps", "logits")]
  assert len(per_row) == 7   # not the batch statistics: z0 (kl), and the loss and λ through it
  for other in got[1:]:
    assert other.keys() == got[0].keys()
    for k in per_row:
      np.testing.assert_allclose(other[k], got[0][k], rtol=2e-5, atol=2e-5, err_msg=k)
  # logps/*: the completions' summed log-probs, restated here in NumPy from the logits
  batch = next(preference.eval_batches(run.eval_examples, len(labels), run.train_data.buckets,
                                       run.train_data.pad_id))
  model = core.merge(core.split(run.model_cfg)[0], state["params"])
  hidden, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"])
  logits = np.asarray(hidden @ model.unembedding(), np.float64)[:len(labels), :-1]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)
                         ) - logits.max(-1, keepdims=True)
  picked = np.take_along_axis(logp, batch["tokens"][:len(labels), 1:, None], -1)[..., 0]
  seq = (picked * batch["loss_mask"][:len(labels), 1:]).sum(-1)
  m = got[0]
  np.testing.assert_allclose(m["eval/logps/chosen"], seq[labels == 1].mean(), rtol=1e-5)
  np.testing.assert_allclose(m["eval/logps/rejected"], seq[labels == 0].mean(), rtol=1e-5)
  np.testing.assert_allclose(m["eval/rewards/margins"],
                             m["eval/rewards/chosen"] - m["eval/rewards/rejected"], atol=1e-6)
  assert abs(m["eval/rewards/margins"]) > 1e-4
