"""Runs a benchmark's worker as n processes of one jax.distributed job on this machine."""
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def processes(argv: list, n: int, devices_each: int) -> int:
  """`python *argv` as n processes (n = 1: a plain process), each with `devices_each` CPU devices
  and dpo_jax.distributed's environment; returns the worst exit status."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}"}
  if n > 1:
    env.update(DPO_JAX_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
               JAX_NUM_PROCESSES=str(n))
  procs = [subprocess.Popen([sys.executable, *argv], cwd=REPO,
                            env={**env, "JAX_PROCESS_ID": str(i)}) for i in range(n)]
  return max(p.wait() for p in procs)
