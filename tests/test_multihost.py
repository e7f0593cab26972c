"""Multi-host: two processes with 4 CPU devices each (jax.distributed on localhost, gloo
collectives between them) train like one process with 8 devices. (The preemption tests give
each process one device: they test the hosts' agreement and resume.)

Each process places only its rows of every batch (sharding.host_local_array), the reference
cache is gathered from devices of both processes (sharding.to_host), and both processes write
the workdir's shared files (writers.write_atomic). The score, rank and export tools run the same
way, and a SIGTERM that reaches one process stops both at the same step.
"""
import concurrent.futures
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from dpo_jax import checkpoint, distributed, sharding, train, writers
from dpo_jax.data.tiny_tasks import ASSET
from dpo_jax.models import load
from helpers import REPO, config, xla_env

# Precomputed reference (a cache gathered over both processes) and prompt sharing (packed rows,
# split by host) on a 3-axis mesh.
# Two steps, each logged: at step 1 the margins are f32 reduction-order noise around 0
# (reference = initial policy), so rewards/accuracies there is 0 or 1/8 by chance and is not
# compared.
OVERRIDES = {"reference.mode": "precomputed", "data.share_prompt": True,
             "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "optim.lr": 1e-3,
             "optim.eps": 1e-6, "steps": 2, "log_every": 1, "progress": False}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_processes(args, n: int = 2, devices_each: int = 4, **env) -> list:
  """`python *args` as n processes of one jax.distributed job."""
  port = free_port()
  return [subprocess.Popen(
      [sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env=xla_env(devices_each, DPO_JAX_DISTRIBUTED="1",
                             JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                             JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i), **env))
      for i in range(n)]


def run_processes(args, meanwhile, n: int = 2, devices_each: int = 4):
  """start_processes, while this process runs meanwhile(processes); returns each process's
  (stdout, stderr) after checking that all succeeded."""
  procs = start_processes(args, n, devices_each)
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
  # 80 pairs (72 to train, 8 held out): the reference pass scores each of them.
  data = tmp_path / "pairs.jsonl"
  with open(ASSET) as f:
    data.write_text("".join(f.readlines()[:80]))
  overrides = {**OVERRIDES, "data.train": str(data)}
  # Meanwhile, the same run in this process on its 8 devices.
  cfg = config(**{k.replace(".", "__"): v for k, v in overrides.items()})
  outs = run_processes(
      ["-m", "dpo_jax.main", "--config", "configs/dpo.py:runlocal", "--workdir", str(multi),
       *(f"--config.{k}={v}" for k, v in overrides.items())],
      lambda _: train.train_and_evaluate(cfg, str(single)))
  assert "devices:      8 cpu (4 per process × 2 processes)" in outs[0][0]
  assert "held-out:" in outs[0][0] and "held-out:" not in outs[1][0]   # process 0 reports

  one, two = writers.read_metrics(single), writers.read_metrics(multi)
  assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2]
  for a, b in zip(one, two):
    assert a.keys() == b.keys()
    for k in a.keys() - ({"rewards/accuracies"} if a["step"] == 1 else set()):
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


HOST_LOCAL = """
import jax, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from dpo_jax import distributed, sharding
distributed.maybe_initialize()
by = {}
for d in jax.devices():
  by.setdefault(d.process_index, []).append(d)
g = np.arange(8 * 2 * 4).reshape(8, 2, 4)
for order in (jax.devices(), [d for ds in zip(*by.values()) for d in ds]):
  for shape, spec in (((4, 1, 1), P(("data", "fsdp"))), ((2, 1, 2), P("data", None, "tensor"))):
    x = sharding.host_local_array(g, NamedSharding(sharding.make_mesh(*shape, order), spec))
    assert np.array_equal(multihost_utils.process_allgather(x, tiled=True), g), (order, spec)
print("placed")
"""


def test_a_host_places_its_rows_wherever_the_mesh_puts_its_devices():
  """A TPU mesh orders devices by their place in the torus, so one host's shards of the batch
  may lie between another's (here p0d0, p1d0, p0d1, p1d1): each host still places exactly its
  rows, on a 1-axis and a 2-axis sharding."""
  outs = run_processes(["-c", HOST_LOCAL], lambda _: None, devices_each=2)
  assert all(out.strip().endswith("placed") for out, _ in outs)


def test_distributed_start_reads_the_environment(monkeypatch):
  """DPO_JAX_DISTRIBUTED is read as a yes/no word (anything else is named); JAX_NUM_PROCESSES
  and JAX_PROCESS_ID are passed when set, and what is unset is left to JAX's own detection."""
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "DPO_JAX_HEARTBEAT_TIMEOUT_S"):
    monkeypatch.delenv(name, raising=False)
  for off in ("0", "false", "No", ""):
    monkeypatch.setenv("DPO_JAX_DISTRIBUTED", off)
    assert not distributed.maybe_initialize()
  monkeypatch.setenv("DPO_JAX_DISTRIBUTED", "True")
  assert distributed.maybe_initialize() and calls.pop() == {}
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "2")
  assert distributed.maybe_initialize()
  assert calls.pop() == {"num_processes": 4, "process_id": 2}
  monkeypatch.setenv("JAX_PROCESS_ID", "two")
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='two' must be an integer"):
    distributed.maybe_initialize()
  monkeypatch.setenv("DPO_JAX_DISTRIBUTED", "maybe")
  with pytest.raises(ValueError, match="DPO_JAX_DISTRIBUTED='maybe': use 1"):
    distributed.maybe_initialize()
  assert not calls


PREEMPT = {"steps": 12, "log_every": 1, "eval_every": 0, "ckpt_every": 100, "optim.lr": 1e-3,
           "optim.eps": 1e-6, "progress": False}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The PREEMPT run in this process on its 8 devices, never interrupted: run when a test first
  asks for it (while that test's processes run), then shared. The preemption tests compare
  with it; their processes have one device each (host-side agreement and resume are what they
  test; the sharding across processes is test_two_processes_train_like_one's)."""
  workdir, done = tmp_path_factory.mktemp("uninterrupted"), []

  def get():
    if not done:   # a run that failed is run again (on a fresh workdir) by the next test
      shutil.rmtree(workdir, ignore_errors=True)
      train.train_and_evaluate(config(**{k.replace(".", "__"): v for k, v in PREEMPT.items()}),
                               str(workdir))
      done.append(True)
    return workdir
  return get


def assert_same_metrics(single, multi, steps: int):
  """Every logged value of the run in `multi` equals the one in `single` within 1e-5."""
  one, two = writers.read_metrics(single), writers.read_metrics(multi)
  assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, steps + 1))
  for a, b in zip(one, two):
    for k in a:
      if not k.startswith("perf/"):
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5, err_msg=f"{a['step']}:{k}")


def test_a_signal_on_one_host_stops_every_host_at_the_same_step(tmp_path, uninterrupted):
  """SIGTERM reaches one host of a pod: the hosts agree on a step (StopAgreement, through the
  coordination service), all save that step's checkpoint together and exit cleanly, and the
  same command resumes on both."""
  multi = tmp_path / "two_processes"
  args = ["-m", "dpo_jax.main", "--config", "configs/dpo.py:runlocal", "--workdir", str(multi),
          *(f"--config.{k}={v}" for k, v in PREEMPT.items())]

  def signal_host_1_then_run_here(procs):
    metrics = multi / "metrics.jsonl"
    while procs[1].poll() is None and not (metrics.exists()
                                           and len(metrics.read_text().splitlines()) >= 2):
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    uninterrupted()

  outs = run_processes(args, signal_host_1_then_run_here, devices_each=1)
  stopped = [int(out.split("after step ")[1].split(";")[0]) for out, _ in outs]
  assert "preempted: stopped by SIGTERM on process 1 after step" in outs[0][0]
  assert "preempted: stopped by SIGTERM after step" in outs[1][0]
  assert stopped[0] == stopped[1] and 2 <= stopped[0] < PREEMPT["steps"]
  assert [r["step"] for r in writers.read_metrics(multi)] == list(range(1, stopped[0] + 1))
  assert os.listdir(multi / "checkpoints" / str(stopped[0]))   # written by both, at that step

  outs = run_processes(args, lambda _: None, devices_each=1)   # the same command again
  assert "last row:" in outs[0][0]   # resumed on both hosts and finished
  assert_same_metrics(uninterrupted(), multi, PREEMPT["steps"])


def test_a_host_killed_hard_ends_the_job_and_the_rerun_resumes(tmp_path, uninterrupted):
  """SIGKILL on process 1 (a lost VM) after the step-4 checkpoint: process 0 does not hang, JAX
  terminates it (after a failed collective, or when process 1's heartbeat times out: 5 s here),
  and the same command, run again, resumes from step 4 on both and ends as an uninterrupted
  run."""
  multi = tmp_path / "two_processes"
  settings = {**PREEMPT, "ckpt_every": 4}
  args = ["-m", "dpo_jax.main", "--config", "configs/dpo.py:runlocal", "--workdir", str(multi),
          *(f"--config.{k}={v}" for k, v in settings.items())]
  manifest = multi / "checkpoints" / "4" / checkpoint.MANIFEST
  procs = start_processes(args, devices_each=1, DPO_JAX_HEARTBEAT_TIMEOUT_S="5")
  try:
    while procs[1].poll() is None and not manifest.exists():
      time.sleep(0.2)
    procs[1].kill()
    procs[1].communicate()
    uninterrupted()   # meanwhile (checkpoints do not change the metrics)
    _, err = procs[0].communicate(timeout=300)   # raises if process 0 hangs
  finally:
    for p in procs:
      p.kill()
  # JAX ends it: "Terminating process because the JAX distributed service detected fatal errors"
  # (after a collective's "Connection closed by peer" if it was in one).
  assert procs[0].returncode != 0 and "detected fatal errors" in err, err[-3000:]
  saved_at = manifest.stat().st_mtime_ns

  outs = run_processes(args, lambda _: None, devices_each=1)   # the same command again
  assert "last row:" in outs[0][0]
  assert manifest.stat().st_mtime_ns == saved_at   # resumed from it, not rewritten
  assert_same_metrics(uninterrupted(), multi, PREEMPT["steps"])


class MemoryKV:
  """The three calls of jax.distributed's key-value client that StopAgreement uses."""

  def __init__(self):
    self.kv, self.cond = {}, threading.Condition()

  def key_value_set(self, key, value):
    with self.cond:
      assert key not in self.kv, key
      self.kv[key] = value
      self.cond.notify_all()

  def key_value_dir_get(self, prefix):
    with self.cond:
      return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]

  def blocking_key_value_get(self, key, timeout_ms):
    with self.cond:
      if not self.cond.wait_for(lambda: key in self.kv, timeout_ms / 1000):
        raise TimeoutError(key)
      return self.kv[key]


def test_hosts_agree_on_the_stop_step_without_a_collective():
  """Process 1 is signalled at step 2 and reaches step 4 (its step + LEAD) before process 0 has
  seen the notice: it waits there, process 0 posts step 3, and both stop after step 5."""
  kv = MemoryKV()
  host = [distributed.StopAgreement(kv, p, 2, "run/0") for p in (0, 1)]
  assert [host[0].should_stop(1, None), host[1].should_stop(1, None)] == [False, False]
  assert not host[0].should_stop(2, None)
  assert not host[1].should_stop(2, "SIGTERM on process 1")
  assert not host[1].should_stop(3, None)

  waiting = concurrent.futures.ThreadPoolExecutor(1).submit(host[1].should_stop, 4, None)
  time.sleep(0.3)
  assert not waiting.done()   # process 1 waits at 2 + LEAD for process 0's step
  assert not host[0].should_stop(3, None)   # sees the notice: posts 3, so stop after 3 + LEAD
  assert waiting.result(timeout=10) is False
  for p in (0, 1):
    assert [host[p].should_stop(s, None) for s in (4, 5)] == [False, True]
    assert host[p].notice == "SIGTERM on process 1"
  assert sorted(kv.kv) == ["run/0/notice/1", "run/0/step/0", "run/0/step/1"]

  # Two signals at once, in another run of the same processes: one agreed step, no waiting.
  host = [distributed.StopAgreement(kv, p, 2, "run/1") for p in (0, 1)]
  assert not host[0].should_stop(7, "SIGINT on process 0")
  assert not host[1].should_stop(7, "SIGTERM on process 1")
  assert [[h.should_stop(s, None) for s in (8, 9)] for h in host] == [[False, True]] * 2

  # A process that never reports: the wait ends with an error naming it.
  lonely = distributed.StopAgreement(kv, 0, 2, "run/2", timeout_s=0.2)
  assert not lonely.should_stop(1, "SIGTERM on process 0")
  assert not lonely.should_stop(2, None)
  with pytest.raises(RuntimeError, match="process 1 did not report its step within"):
    lonely.should_stop(3, None)


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



def tokenise_shared(data):
  """Tokenises `data` as a process of a job does; prints how many sequences this process
  rendered and what it ended with, and an exchange of bytes of different lengths."""
  import dataclasses
  import json

  from dpo_jax import distributed
  from dpo_jax.data import preference as P
  from dpo_jax.data.tokenizer import byte_tokenizer
  distributed.maybe_initialize()
  rendered, render = [], P._render
  P._render = lambda tok, prompt, *a: rendered.append(prompt) or render(tok, prompt, *a)
  source, rows = P.load_rows(data)
  examples, skipped = P.tokenize_rows(rows, byte_tokenizer(), P.TokenizeOptions(96, 48), source,
                                      "skip", **distributed.tokenize_split())
  n = len(rendered)
  # the same rows as a stream (no random access: each process reads all and tokenises its own),
  # in rounds of 8
  streamed = P.tokenize_rows(P._Stream(rows), byte_tokenizer(), P.TokenizeOptions(96, 48),
                             source, "skip", round_rows=8, **distributed.tokenize_split())
  me = jax.process_index()
  blobs = distributed.allgather_bytes(bytes([me]) * (3 + 4 * me), chunk=2)
  print(json.dumps({"rendered": n, "skipped": skipped, "blobs": [b.hex() for b in blobs],
                    "examples": [dataclasses.asdict(e) for e in examples],
                    "streamed": [[dataclasses.asdict(e) for e in streamed[0]], streamed[1]],
                    "streamed_rendered": len(rendered) - n}))


def test_processes_share_the_tokenising(tmp_path, monkeypatch):
  """Each of 2 processes renders half of the rows and both end with every example, as one
  process tokenising them all does (a bad line and a row of the other kind are skipped); so do
  the same rows streamed."""
  import dataclasses
  import json

  from dpo_jax.data import preference as P
  from dpo_jax.data.tokenizer import byte_tokenizer

  data = tmp_path / "pairs.jsonl"
  with open(ASSET) as f:
    lines = f.readlines()[:21]
  lines[4:4] = ["{bad\n", json.dumps({"prompt": "p", "completion": "c", "label": True}) + "\n"]
  data.write_text("".join(lines))
  outs = run_processes(["-c", "import sys; sys.path.insert(0, 'tests'); "
                        "from test_multihost import tokenise_shared; tokenise_shared(sys.argv[1])",
                        str(data)], lambda _: None)
  got = [json.loads(out.splitlines()[-1]) for out, _ in outs]

  rendered, render = [], P._render
  monkeypatch.setattr(P, "_render", lambda tok, prompt, *a: rendered.append(prompt) or
                      render(tok, prompt, *a))
  source, rows = P.load_rows(str(data))
  examples, skipped = P.tokenize_rows(rows, byte_tokenizer(), P.TokenizeOptions(96, 48), source,
                                      "skip")
  assert len(examples) == 21 and skipped == 2
  for g in got:
    assert g["examples"] == [dataclasses.asdict(e) for e in examples]
    assert g["skipped"] == 2
    assert g["blobs"] == ["000000", "01" * 7]
    assert g["streamed"] == [g["examples"], 2]
  for key in ("rendered", "streamed_rendered"):
    assert got[0][key] + got[1][key] == len(rendered) == 21 + 1   # rows, once each
    assert max(g[key] for g in got) <= len(rendered) // 2 + 1


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
