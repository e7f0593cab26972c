"""Tests run on CPU with 8 fake devices; XLA_FLAGS must be set before jax is imported."""
import os

# LLVM -O0 for XLA's CPU code: the tests' programs are tiny, so compiling dominates their time
# (about a fifth less with -O0). It changes how LLVM builds the machine code, not the HLO program
# XLA optimises and runs. Subprocesses inherit it (helpers.xla_env); the quickstart, bench and
# benchmarks/ compile at XLA's default level.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent XLA compilation cache per test session, shared by the xdist workers and the
# CLI subprocesses (they inherit the environment): the kill/resume tests compile the same step
# in several processes. A fresh directory each session, so nothing carries over between runs;
# the process that made it (the xdist controller, or the only process) removes it at exit, as
# it holds up to ~40 MB of compiled programs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  _cache_dir = tempfile.mkdtemp(prefix="dpo_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.device_count()}"


@pytest.fixture(scope="session")
def n_devices():
  return jax.device_count()
