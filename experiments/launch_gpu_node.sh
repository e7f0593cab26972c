#!/usr/bin/env bash
# Runs one dpo_jax config on a single GPU node, all of its GPUs in one process (FSDP mesh).
#
#   bash experiments/launch_gpu_node.sh CONFIG WORKDIR [--config.key=value ...]
#   e.g. bash experiments/launch_gpu_node.sh configs/paper/qwen25_7b_instruct__dpo.py /data/runs/q7
#
# Installs the CUDA build of jax on first use. Re-running the same command resumes from
# WORKDIR's latest checkpoint; SIGTERM / Ctrl-C saves a checkpoint and exits 0.
# Several nodes: run this on each node with DPO_JAX_DISTRIBUTED=1, JAX_COORDINATOR_ADDRESS=
# host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID set (dpo_jax/distributed.py), WORKDIR shared.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,11p' "$0"; exit 2
fi
CONFIG="$1"; WORKDIR="$(realpath -m "$2")"; shift 2
# A config path given relative to where the command runs (its ":arg" suffix kept), else the repo.
BASE="${CONFIG%%:*}"
if [ -e "$BASE" ]; then CONFIG="$(realpath "$BASE")${CONFIG:${#BASE}}"; fi
cd "$(dirname "$0")/.."
# One process drives every GPU of the node: under SLURM, JAX would give it only $SLURM_LOCALID's.
if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${JAX_LOCAL_DEVICE_IDS:-}" ]; then
  JAX_LOCAL_DEVICE_IDS="$(nvidia-smi -L | awk '{printf "%s%d", (NR > 1 ? "," : ""), NR - 1}')"
  export JAX_LOCAL_DEVICE_IDS
fi
python -c "import jax; assert jax.default_backend() == 'gpu'" 2>/dev/null \
  || pip install -q -e . 'jax[cuda12]==0.10.2'
# Let XLA use most of the GPU memory up front (the step's peak is known after compilation).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
exec python -m dpo_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@"
