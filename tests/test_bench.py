"""dpo_jax.bench: the JSON contract, the FLOP formula, and the reference term."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from dpo_jax import bench, train
from helpers import REPO, xla_env

TINY = {"model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 2,
        "model.num_heads": 4, "model.num_kv_heads": 2, "model.vocab_size": 96,
        "batch": 8, "seq": 32, "steps": 2, "warmup": 1, "peak.size": 256, "peak.reps": 3}


def expected_flops(batch, seq, d, f, layers, heads, kv_heads, vocab, ref: bool,
                   scored=None, rows=None) -> int:
  """The documented count, written out independently of bench.flops: the layers at every
  position of a row, the unembedding (D·V) at `scored` positions of it (default all)."""
  dh = d // heads
  body = layers * (d * heads * dh + 2 * d * kv_heads * dh + heads * dh * d + 3 * d * f)
  attn = layers * seq * heads * dh
  per_token = 6 * body + 12 * attn + ((2 * body + 4 * attn) if ref else 0)
  unembed = (8 if ref else 6) * d * vocab
  rows = 2 * batch if rows is None else rows
  return rows * (per_token * seq + unembed * (seq if scored is None else scored))


def bench_config(**overrides):
  from dpo_jax import configlib
  c = bench.get_config()
  for k, v in {**TINY, **overrides}.items():
    configlib.set_key(c, k, v)
  return c


def check_row(row, ref: bool):
  assert row["batch"] == 8 and row["seq"] == 32 and row["rows"] == 16
  assert row["tokens_per_step"] == 2 * 8 * 32
  # 16 prompt + 16 completion tokens: the unembedding runs on the 16 completion positions
  assert row["scored_per_row"] == 16
  want = expected_flops(8, 32, 32, 64, 2, 4, 2, 96, ref, scored=16)
  assert row["flops_per_step"] == want
  assert want < expected_flops(8, 32, 32, 64, 2, 4, 2, 96, ref)
  assert row["step_s"] > 0 and row["compile_s"] > 0
  assert row["pairs_per_s"] == pytest.approx(8 / row["step_s"])
  assert row["tokens_per_s"] == pytest.approx(2 * 8 * 32 / row["step_s"])
  assert row["mfu"] == pytest.approx(want / row["step_s"] / row["peak_flops"])
  assert 0 < row["mfu"] < 1.5
  assert row["peak_flops"] > 1e6 and row["peak_bytes"] > 0
  assert row["reference_forward"] is ref
  assert "6*N" in row["flops_definition"] and "peak" in row["peak_definition"]
  assert row["model"]["hidden_size"] == 32 and row["model"]["num_layers"] == 2
  assert row["dtype"] == "float32" and row["devices"]["count"] >= 1
  assert row["peak_dtype"] == "float32" and "float32 [256,256]" in row["peak_definition"]


@pytest.fixture(scope="module")
def cli():
  """`python -m dpo_jax.bench --json` with --config overrides, on one CPU device; started at
  once and read when first needed, so that it compiles while the in-process test runs."""
  flags_ = [f"--config.{k}={v}" for k, v in TINY.items()]
  env = xla_env(1, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-m", "dpo_jax.bench", "--json", *flags_], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  result = {}

  def get():
    if not result:
      out, err = proc.communicate(timeout=600)
      assert proc.returncode == 0, err[-3000:]
      result["stdout"] = out
    return result["stdout"]
  yield get
  if proc.poll() is None:
    proc.kill()
    proc.communicate()


def test_reference_free_drops_the_reference_term(cli):
  """In-process, the same shape without a reference forward (SimPO, reference.mode=none) counts
  exactly 2N + 4A per token less than the CLI's DPO run with reference.mode=initial."""
  no_ref = bench.run_bench(bench_config(**{"loss.name": "simpo", "reference.mode": "none"}),
                           devices=jax.devices()[:1], log=lambda _: None)
  check_row(no_ref, ref=False)
  assert no_ref["reference_mode"] == "none" and no_ref["loss"] == "simpo"
  with_ref = json.loads(cli())
  d, f, layers, dh, vocab = 32, 64, 2, 8, 96
  n = layers * (d * dh * (2 * 4 + 2 * 2) + 3 * d * f) + d * vocab
  attn = layers * 32 * 4 * dh
  assert with_ref["n_params_matmul"] == no_ref["n_params_matmul"] == n
  # the reference's layers on all 32 positions, its unembedding on the 16 scored ones
  assert (with_ref["flops_per_step"] - no_ref["flops_per_step"]
          == ((2 * (n - d * vocab) + 4 * attn) * 32 + 2 * d * vocab * 16) * 2 * 8)


def test_cli_prints_one_json_line(cli):
  lines = cli().strip().splitlines()
  assert len(lines) == 1, cli()
  row = json.loads(lines[0])
  check_row(row, ref=True)
  assert row["devices"]["count"] == 1 and row["reference_mode"] == "initial"
  assert row["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}


def test_bad_settings_are_named():
  """A diverged loss prints null (strict JSON); a negative warmup and a misspelt key are named,
  the key as the flag that gave it."""
  line = bench.json_line({"loss_value": float("nan"), "x": {"y": [float("inf"), 1.5]}})
  assert json.loads(line) == {"loss_value": None, "x": {"y": [None, 1.5]}}
  with pytest.raises(ValueError, match=r"config.warmup=-1 \(untimed steps\) must be >= 0"):
    bench.run_bench(bench_config(warmup=-1), devices=jax.devices()[:1], log=lambda _: None)
  out = subprocess.run([sys.executable, "-m", "dpo_jax.bench", "--config.model.hiden_size=64"],
                       cwd=REPO, env=xla_env(1), capture_output=True, text=True, timeout=300)
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert "unknown config key in --config.model.hiden_size" in out.stderr


def test_flops_formula_matches_issue_shape():
  """The issue's tiny Llama: 8 pairs x 256 tokens, d=256, 4 layers, 4 heads, F=1024, V=2048."""
  from dpo_jax.models.config import ModelConfig
  cfg = ModelConfig(vocab_size=2048, hidden_size=256, intermediate_size=1024, num_layers=4,
                    num_heads=4, num_kv_heads=4)
  got = bench.flops(cfg, 8, 256, reference_forward=True)
  assert got["n_params_matmul"] == 4 * (4 * 256 * 256 + 3 * 256 * 1024) + 256 * 2048
  assert got["flops_per_step"] == expected_flops(8, 256, 256, 1024, 4, 4, 4, 2048, True)
  tied = bench.flops(cfg.replace(tie_word_embeddings=True), 8, 256, reference_forward=True)
  assert tied["flops_per_step"] == got["flops_per_step"]   # the unembedding matmul still runs
  half = bench.flops(cfg, 8, 256, reference_forward=True, scored=128)
  assert half["flops_per_step"] == expected_flops(8, 256, 256, 1024, 4, 4, 4, 2048, True, 128)
  assert got["flops_per_step"] - half["flops_per_step"] == 16 * 128 * 8 * 256 * 2048


def test_shared_prompt_counts_the_rows_it_computes():
  """share_prompt: `batch` rows of seq + completion tokens [prompt | chosen | rejected]; FLOPs
  are those of the tokens computed (A at the row length), pairs/s counts the pairs."""
  row = bench.run_bench(bench_config(share_prompt=True), devices=jax.devices()[:1],
                        log=lambda _: None)
  assert row["share_prompt"] and row["rows"] == 8 and row["row_length"] == 2 * 32 - 16
  assert row["tokens_computed_per_step"] == 8 * 48 and row["tokens_per_step"] == 2 * 8 * 32
  # 32 completion positions per row: K = 36, the smallest multiple of 48/4 that holds them
  assert row["scored_per_row"] == 36
  assert row["flops_per_step"] == expected_flops(4, 48, 32, 64, 2, 4, 2, 96, True, scored=36,
                                                 rows=8)
  assert row["pairs_per_s"] == pytest.approx(8 / row["step_s"])
  assert np.isfinite(row["loss_value"]) and row["loss_value"] > 0


def test_peak_matmul_is_in_the_compute_dtype():
  """MFU of a bf16 step is measured against a bf16 matmul (on GPUs an f32/TF32 peak is half
  the bf16 one or less, which would at least double the MFU); peak.dtype overrides; a bad
  value is named."""
  assert bench.peak_dtype(bench_config()) == "float32"
  assert bench.peak_dtype(bench_config(**{"model.dtype": "bfloat16"})) == "bfloat16"
  assert bench.peak_dtype(bench_config(**{"model.dtype": "bfloat16",
                                          "peak.dtype": "float32"})) == "float32"
  devices = jax.devices()[:2]
  mm, a, b = bench.peak_matmul(devices, 64, "bfloat16")
  assert a.dtype == b.dtype == jax.numpy.bfloat16 and a.shape == (2, 64, 64)
  assert len(a.sharding.device_set) == 2
  hlo = mm.lower(a, b).as_text()
  assert "dot_general" in hlo and "tensor<2x64x64xbf16>" in hlo
  np.testing.assert_allclose(np.asarray(mm(a, b), np.float32),
                             np.einsum("nij,njk->nik", np.asarray(a, np.float32),
                                       np.asarray(b, np.float32)), rtol=0.05, atol=0.05)
  peak = bench.measure_peak(devices, 64, 2, "bfloat16")
  assert peak["peak_dtype"] == "bfloat16" and peak["peak_flops"] > 0
  assert "bfloat16 [64,64]@[64,64]" in peak["peak_definition"]
  assert "[2048,2048]" in bench.measure_peak(devices[:1], 0, 1)["peak_definition"]   # 0: CPU's
  with pytest.raises(ValueError, match=r"config\.peak\.dtype='int8'"):
    bench.run_bench(bench_config(**{"peak.dtype": "int8"}), devices=devices[:1],
                    log=lambda _: None)


def test_from_data_times_the_trainers_own_batches():
  """config.from_data: the steps run on the shipped pairs as the trainer packs them, every
  batch shape compiled before timing; FLOPs, tokens and padding are the timed batches' own."""
  c = bench_config(**{"from_data": True, "data.packing": True, "model.vocab_size": 264,
                      "steps": 4, "warmup": 2})
  run, host, _ = bench.prepare_data(c, jax.devices()[:1])
  row = bench.run_bench(c, devices=jax.devices()[:1], log=lambda _: None)
  assert row["from_data"] and row["step_s_stat"] == "mean" and row["steps_timed"] == 4
  assert row["programs_compiled"] == len({train.batch_signature(b) for b in host})
  assert row["data"]["packing"] and row["data"]["examples"] == len(run.train_data)
  timed = host[2:]
  seg = [np.asarray(b["segment_ids"]) for b in timed]
  # Packed rows: every real token belongs to one sequence (prompt included in each).
  assert row["tokens_per_step"] == pytest.approx(np.mean([(s > 0).sum() for s in seg]))
  assert row["data"]["pad_fraction"] == pytest.approx(np.mean([(s == 0).mean() for s in seg]))
  want = [expected_flops(0, b["tokens"].shape[-1], 32, 64, 2, 4, 2, 264, True,
                         scored=b["score_index"].shape[-1] if "score_index" in b else None,
                         rows=b["tokens"].shape[0] * b["tokens"].shape[1]) for b in timed]
  assert row["flops_per_step"] == pytest.approx(np.mean(want))
  assert row["pairs_per_s"] == pytest.approx(8 / row["step_s"])
  assert row["mfu"] == pytest.approx(np.mean(want) / row["step_s"] / row["peak_flops"])
  assert np.isfinite(row["loss_value"]) and row["peak_bytes"] > 0
  with pytest.raises(ValueError, match=r"config\.share_prompt.*config\.data\.share_prompt"):
    bench.run_bench(bench_config(from_data=True, share_prompt=True),
                    devices=jax.devices()[:1], log=lambda _: None)



def test_memory_report_runs_every_option(tmp_path):
  """benchmarks/memory_report.py (README's memory table) at a tiny shape: one row per option,
  each compiled and run. (That chunks bound the logits' memory is test_logprobs'.)"""
  sys.path.insert(0, f"{REPO}/benchmarks")
  import memory_report   # noqa: PLC0415
  argv = ["--hidden", "64", "--layers", "1", "--heads", "2", "--vocab", "512", "--batch", "2",
          "--seq", "64", "--json", str(tmp_path / "rows.json")]
  memory_report.main(argv)
  got = json.loads((tmp_path / "rows.json").read_text())["rows"]
  want = memory_report.rows(memory_report.parser().parse_args(argv))
  assert [(r["option"], r["overrides"]) for r in got] == want
  assert all(r["peak_bytes"] > r["memory"]["temp_size"] > 0 and r["step_s"] > 0 for r in got)
