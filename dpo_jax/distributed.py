"""Multi-host start-up: jax.distributed is initialised when the environment asks for it.

TPU VM pod: run the same command on every worker (`gcloud compute tpus tpu-vm ssh ... --worker=all
--command=...`) with DPO_JAX_DISTRIBUTED=1; JAX discovers the coordinator from the TPU metadata.
Multi-node GPU: set DPO_JAX_DISTRIBUTED=1 plus JAX_COORDINATOR_ADDRESS=host:port,
JAX_NUM_PROCESSES and JAX_PROCESS_ID on each node (SLURM's variables are detected
automatically). Single host: nothing to do.
"""
import os

import jax


def maybe_initialize() -> bool:
  if os.environ.get("DPO_JAX_DISTRIBUTED", "0") not in ("1", "true"):
    return False
  kwargs = {}
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)
  return True
