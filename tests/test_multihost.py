"""Multi-host: two processes with 4 CPU devices each (jax.distributed on localhost, gloo
collectives between them) train like one process with 8 devices.

Each process places only its rows of every batch (sharding.host_local_array), the reference
cache is gathered from devices of both processes (sharding.to_host), and both processes write
the workdir's shared files (writers.write_atomic). The score, rank and export tools run the same
way, and a SIGTERM that reaches one process stops both at the same step.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from dpo_jax import checkpoint, sharding, train, writers
from dpo_jax.models import load
from helpers import REPO, config, xla_env

# Precomputed reference (a cache gathered over both processes) and prompt sharing (packed rows,
# split by host) on a 3-axis mesh.
# Two steps, logged at step 2 only: after step 1 the margins are f32 reduction-order noise around
# 0 (reference = initial policy), so rewards/accuracies there is 0 or 1/8 by chance.
OVERRIDES = {"reference.mode": "precomputed", "data.share_prompt": True,
             "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "optim.lr": 1e-3,
             "optim.eps": 1e-6, "steps": 2, "progress": False}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_processes(args, meanwhile, n: int = 2, devices_each: int = 4):
  """`python *args` as n processes of one jax.distributed job, while this process runs
  meanwhile(processes); returns each process's (stdout, stderr) after checking that all succeeded."""
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env=xla_env(devices_each, DPO_JAX_DISTRIBUTED="1",
                             JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                             JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i)))
      for i in range(n)]
  try:
    meanwhile(procs)
    outs = [p.communicate(timeout=900) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for i, (p, (_, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{err[-3000:]}"
  return outs


def final_params(workdir, mesh, rules):
  cfg, _ = checkpoint.load_model_config(str(workdir))
  return jax.device_get(load.load_params(str(workdir), cfg, mesh, rules))


def test_two_processes_train_like_one(tmp_path):
  assert jax.device_count() == 8
  multi, single = tmp_path / "two_processes", tmp_path / "one_process"
  # Meanwhile, the same run in this process on its 8 devices.
  cfg = config(**{k.replace(".", "__"): v for k, v in OVERRIDES.items()})
  outs = run_processes(
      ["-m", "dpo_jax.main", "--config", "configs/dpo.py:runlocal", "--workdir", str(multi),
       *(f"--config.{k}={v}" for k, v in OVERRIDES.items())],
      lambda _: train.train_and_evaluate(cfg, str(single)))
  assert "devices:      8 cpu (4 per process × 2 processes)" in outs[0][0]
  assert "held-out:" in outs[0][0] and "held-out:" not in outs[1][0]   # process 0 reports

  one, two = writers.read_metrics(single), writers.read_metrics(multi)
  assert [r["step"] for r in two] == [r["step"] for r in one] == [2]
  for a, b in zip(one, two):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5, err_msg=k)
  assert "eval/rewards/accuracies" in two[-1]

  # The reference cache has the same name (a hash of the same initial weights, gathered from
  # both processes) and the same log-probs.
  caches = sorted(os.listdir(single / "ref_cache"))
  assert caches and sorted(os.listdir(multi / "ref_cache")) == caches
  for name in caches:
    with np.load(single / "ref_cache" / name) as a, np.load(multi / "ref_cache" / name) as b:
      assert a.files == b.files
      for k in a.files:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-4, err_msg=f"{name}:{k}")
  assert not [f for f in os.listdir(multi) if ".tmp" in f]

  # The checkpoint the two processes wrote together holds the same weights.
  mesh = sharding.make_mesh(8, 1, 1)
  rules = sharding.rules_from_config({})
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5),
               final_params(single, mesh, rules), final_params(multi, mesh, rules))


PREEMPT = {"steps": 12, "log_every": 1, "eval_every": 0, "ckpt_every": 100, "optim.lr": 1e-3,
           "optim.eps": 1e-6, "progress": False}


def test_a_signal_on_one_host_stops_every_host_at_the_same_step(tmp_path):
  """SIGTERM reaches one host of a pod: the hosts agree on the flag after a step, all save that
  step's checkpoint together and exit cleanly, and the same command resumes on both."""
  multi, single = tmp_path / "two_processes", tmp_path / "one_process"
  args = ["-m", "dpo_jax.main", "--config", "configs/dpo.py:runlocal", "--workdir", str(multi),
          *(f"--config.{k}={v}" for k, v in PREEMPT.items())]
  cfg = config(**{k.replace(".", "__"): v for k, v in PREEMPT.items()})

  def signal_host_1_then_run_here(procs):
    metrics = multi / "metrics.jsonl"
    while procs[1].poll() is None and not (metrics.exists()
                                           and len(metrics.read_text().splitlines()) >= 2):
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    train.train_and_evaluate(cfg, str(single))   # the uninterrupted run, on 8 devices here

  outs = run_processes(args, signal_host_1_then_run_here)
  stopped = [int(out.split("after step ")[1].split(";")[0]) for out, _ in outs]
  assert "preempted: stopped by a signal on another host after step" in outs[0][0]
  assert "preempted: stopped by SIGTERM after step" in outs[1][0]
  assert stopped[0] == stopped[1] and 2 <= stopped[0] < PREEMPT["steps"]
  assert [r["step"] for r in writers.read_metrics(multi)] == list(range(1, stopped[0] + 1))
  assert os.listdir(multi / "checkpoints" / str(stopped[0]))   # written by both, at that step

  outs = run_processes(args, lambda _: None)   # the same command again: resumes on both hosts
  assert "last step:" in outs[0][0]
  one, two = writers.read_metrics(single), writers.read_metrics(multi)
  assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 13))
  for a, b in zip(one, two):
    for k in a:
      if not k.startswith("perf/"):
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5, err_msg=f"{a['step']}:{k}")


def test_processes_writing_the_same_file_do_not_collide(tmp_path, monkeypatch):
  """Every process writes the workdir's shared outputs (pairs, caches, results); process 1
  finishing its write while process 0 is halfway through its own must leave process 0's write
  intact (with one temporary name for both, process 0's rename found no file)."""
  path = str(tmp_path / "results.json")

  def as_process(i):
    monkeypatch.setattr(writers, "_process", lambda: i)

  def write_0(f):
    f.write('{"a": ')
    as_process(1)
    writers.write_atomic(path, lambda g: g.write('{"a": 1}'))
    as_process(0)
    f.write("1}")

  as_process(0)
  writers.write_atomic(path, write_0)
  assert open(path).read() == '{"a": 1}'
  assert os.listdir(tmp_path) == ["results.json"]

  tok_dir = tmp_path / "tokenizer"
  from dpo_jax.data import synthetic
  for i in (0, 1):
    as_process(i)
    writers.save_tokenizer(synthetic.tokenizer(), str(tok_dir))
  assert sorted(os.listdir(tmp_path)) == ["results.json", "tokenizer"]
  assert "tokenizer.json" in os.listdir(tok_dir)



def run_tools(policy, ref, data, out):
  """score, rank and export, as every host of a pod would run them."""
  from dpo_jax import export, rank, score
  lengths = ["--batch_size", "8", "--max_length", "96", "--max_prompt_length", "48"]
  score.main(["--model", policy, "--ref", ref, "--data", data, "--out", f"{out}/scores.jsonl",
              "--beta", "0.5", *lengths])
  rank.main(["--models", policy, ref, "--data", data, "--bootstrap", "200",
             "--out", f"{out}/ranking.json", *lengths])
  export.main(["--checkpoint", policy, "--out", f"{out}/export", "--dtype", "bfloat16"])


def test_two_processes_score_rank_and_export_like_one(tmp_path):
  """The tools load a Hugging Face directory onto a mesh spanning both processes (FSDP shards on
  each), gather the scores to every process and write each output once, as one process does."""
  import json

  from dpo_jax.data.tiny_tasks import ASSET
  from dpo_jax.data.tokenizer import byte_tokenizer
  from dpo_jax.models import TINY, core, hf_io

  assert jax.device_count() == 8
  models = {}
  for seed, name in enumerate(("policy", "ref")):
    models[name] = str(tmp_path / name)
    hf_io.save_hf(models[name], TINY, core.init_params(TINY, seed), tokenizer=byte_tokenizer())
  data = tmp_path / "pairs.jsonl"
  with open(ASSET) as f:
    data.write_text("".join(f.readlines()[:20]))   # 20 pairs: 3 batches of 8, the last partial
  one, two = tmp_path / "one", tmp_path / "two"
  args = [models["policy"], models["ref"], str(data)]
  outs = run_processes(
      ["-c", "import sys; sys.path.insert(0, 'tests'); from test_multihost import run_tools; "
       "run_tools(*sys.argv[1:])", *args, str(two)],
      lambda _: run_tools(*args, str(one)))   # meanwhile, one process with 8 devices
  # Process 0 alone reports.
  assert "devices:      8 cpu (4 per process × 2 processes)" in outs[0][1]
  assert "scored 20 pairs" in outs[0][1] and "scored" not in outs[1][1]
  for line in ("| 1 |", "exported"):
    assert line in outs[0][0] and line not in outs[1][0]

  rows = [[json.loads(x) for x in open(d / "scores.jsonl")] for d in (one, two)]
  assert len(rows[0]) == len(rows[1]) == 20
  for a, b in zip(*rows):
    assert a.keys() == b.keys() and a["chosen_len"] == b["chosen_len"]
    for k in a:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5, err_msg=k)
  ranks = [json.load(open(d / "ranking.json")) for d in (one, two)]
  assert [r["model"] for r in ranks[1]["ranking"]] == [r["model"] for r in ranks[0]["ranking"]]
  for a, b in zip(ranks[0]["ranking"], ranks[1]["ranking"]):
    np.testing.assert_allclose(b["margin"], a["margin"], rtol=1e-5, atol=1e-5)
    assert b["accuracy"] == a["accuracy"] and b["accuracy_ci"] == a["accuracy_ci"]
  # The export gathered every weight from both processes' shards: the same files, bit for bit.
  for name in ("model.safetensors", "config.json", "tokenizer.json"):
    assert (two / "export" / name).read_bytes() == (one / "export" / name).read_bytes(), name
  assert not [f for d in (two, two / "export") for f in os.listdir(d) if ".tmp" in f]
