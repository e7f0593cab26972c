"""Multi-host start-up: jax.distributed is initialised when the environment asks for it.

TPU VM pod: run the same command on every worker (`gcloud compute tpus tpu-vm ssh ... --worker=all
--command=...`) with DPO_JAX_DISTRIBUTED=1; JAX discovers the coordinator from the TPU metadata.
Multi-node GPU: set DPO_JAX_DISTRIBUTED=1 plus JAX_COORDINATOR_ADDRESS=host:port,
JAX_NUM_PROCESSES and JAX_PROCESS_ID on each node (SLURM's variables are detected
automatically). Single host: nothing to do.

Every entry point that runs a model calls maybe_initialize(): training (dpo_jax.main) and the
score, rank and export tools, so each runs on a pod the same way (the same command on every
host). Calling it again in the same process does nothing.
"""
import os

import jax


def maybe_initialize() -> bool:
  if os.environ.get("DPO_JAX_DISTRIBUTED", "0") not in ("1", "true"):
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs = {}
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)
  return True


def device_line() -> str:
  """e.g. 'devices:      8 cpu (4 per process × 2 processes)', printed by process 0."""
  n = jax.process_count()
  return (f"devices:      {jax.device_count()} {jax.default_backend()} "
          f"({jax.local_device_count()} per process × {n} process{'es' if n > 1 else ''})")
