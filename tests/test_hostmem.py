"""DPO_JAX_CPU_MALLOC (dpo_jax.hostmem): with `heap` the CPU step's buffer is reused, not mapped
afresh every step. Counted with the bench's page faults, in processes of their own: the
setting is process-wide and must come before JAX's CPU client starts."""
import json
import subprocess
import sys

import jax

from helpers import REPO, xla_env

# Small layers, but a temporary buffer well over glibc's largest mmap threshold (32 MiB), which
# the default malloc maps and unmaps every step.
SHAPE = {"model.hidden_size": 64, "model.intermediate_size": 256, "model.num_layers": 2,
         "model.num_heads": 4, "model.num_kv_heads": 4, "model.vocab_size": 512,
         "model.remat": "none", "batch": 4, "seq": 256, "steps": 3, "warmup": 2,
         "peak.size": 256, "peak.reps": 3}


def test_heap_keeps_the_step_buffer():
  assert jax.device_count() == 8
  flags_ = [f"--config.{k}={v}" for k, v in SHAPE.items()]
  procs = {mode: subprocess.Popen(
      [sys.executable, "-m", "dpo_jax.bench", "--json", *flags_], cwd=REPO,
      env=xla_env(1, JAX_PLATFORMS="cpu", DPO_JAX_CPU_MALLOC=mode),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for mode in ("system", "heap")}
  rows = {}
  for mode, proc in procs.items():
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    rows[mode] = json.loads(out)
  temp_pages = rows["system"]["memory"]["temp_size"] / 4096
  assert rows["system"]["memory"]["temp_size"] > 64 << 20
  assert rows["system"]["cpu_malloc"] == "system" and rows["heap"]["cpu_malloc"] == "heap"
  # system: the temporaries' pages are faulted in again every step. heap: they are kept, except
  # in an occasional step where glibc cannot reuse the freed block and grows the heap instead
  # (a whole buffer's pages in that step; docs/performance.md)
  assert rows["system"]["minor_faults_per_step"] > 0.5 * temp_pages
  assert rows["heap"]["minor_faults_per_step"] < rows["system"]["minor_faults_per_step"]
  assert rows["heap"]["loss_value"] == rows["system"]["loss_value"]
  for row in rows.values():   # the peak resident memory held the step's buffer at least once
    assert row["minor_faults_max_step"] >= row["minor_faults_per_step"]
    assert row["host_rss_peak_bytes"] > row["memory"]["temp_size"]


ARENAS = """
import ctypes
import dpo_jax
import jax, jax.numpy as jnp, orbax.checkpoint
x = jnp.ones((256, 256))
(x @ x).block_until_ready()
ctypes.CDLL(None).malloc_stats()   # glibc: one 'Arena i:' block per malloc arena, on stderr
"""


def test_heap_is_set_before_any_thread_starts():
  """Importing dpo_jax applies the setting before jax, orbax or XLA start threads: with heap
  every thread allocates from the one main arena; by default they get arenas of their own."""
  arenas = {}
  for mode in ("system", "heap"):
    out = subprocess.run([sys.executable, "-c", ARENAS], cwd=REPO, capture_output=True,
                         text=True, env=xla_env(1, JAX_PLATFORMS="cpu", DPO_JAX_CPU_MALLOC=mode))
    assert out.returncode == 0, out.stderr[-3000:]
    arenas[mode] = [ln for ln in out.stderr.splitlines() if ln.startswith("Arena ")]
  assert arenas["heap"] == ["Arena 0:"]
  assert len(arenas["system"]) > 1


def test_a_bad_choice_names_the_variable():
  for value in ("hugepages", ""):
    out = subprocess.run(
        [sys.executable, "-c", "from dpo_jax import hostmem; hostmem.use_heap()"], cwd=REPO,
        env=xla_env(1, DPO_JAX_CPU_MALLOC=value), capture_output=True, text=True)
    assert out.returncode != 0
    assert f"DPO_JAX_CPU_MALLOC={value!r}: expected one of system, heap" in out.stderr


def test_heap_applies_only_to_glibcs_own_malloc():
  """use_heap() sets glibc's malloc only when the process's malloc is glibc's: provider() names
  the library each symbol resolves to (with a preloaded tcmalloc, malloc's is tcmalloc's)."""
  from dpo_jax import hostmem   # noqa: PLC0415
  libc = hostmem.provider("gnu_get_libc_version")
  assert libc is not None and "libc" in libc
  assert hostmem.provider("malloc") == libc
  assert hostmem.provider("PyObject_Malloc") not in (None, libc)   # Python's own allocator
  assert hostmem.provider("no_such_symbol_in_this_process") is None
