"""Tests run on CPU with 8 fake devices; XLA_FLAGS must be set before jax is imported."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.device_count()}"


@pytest.fixture(scope="session")
def n_devices():
  return jax.device_count()
