"""Multi-host: two processes with 4 CPU devices each (jax.distributed on localhost, gloo
collectives between them) train like one process with 8 devices.

Each process places only its rows of every batch (sharding.host_local_array), the reference
cache is gathered from devices of both processes (sharding.to_host), and both processes write
the workdir's shared files (writers.write_atomic).
"""
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from dpo_jax import checkpoint, sharding, train, writers
from dpo_jax.models import load
from helpers import REPO, config

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


def start_processes(workdir, n: int = 2, devices_each: int = 4):
  port = free_port()
  cmd = [sys.executable, "-m", "dpo_jax.main", "--config", "configs/dpo.py:runlocal",
         "--workdir", str(workdir), *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]
  procs = []
  for i in range(n):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}",
           "DPO_JAX_DISTRIBUTED": "1", "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
           "JAX_NUM_PROCESSES": str(n), "JAX_PROCESS_ID": str(i)}
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def final_params(workdir, mesh, rules):
  cfg, _ = checkpoint.load_model_config(str(workdir))
  return jax.device_get(load.load_params(str(workdir), cfg, mesh, rules))


def test_two_processes_train_like_one(tmp_path):
  assert jax.device_count() == 8
  multi, single = tmp_path / "two_processes", tmp_path / "one_process"
  procs = start_processes(multi)
  try:
    # Meanwhile, the same run in this process on its 8 devices.
    cfg = config(**{k.replace(".", "__"): v for k, v in OVERRIDES.items()})
    train.train_and_evaluate(cfg, str(single))
    outs = [p.communicate(timeout=900) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for i, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{err[-3000:]}"
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
