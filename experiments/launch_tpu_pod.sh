#!/usr/bin/env bash
# Runs one dpo_jax config on every worker of a TPU VM pod slice.
#
#   bash experiments/launch_tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   e.g. bash experiments/launch_tpu_pod.sh my-v5p-64 us-east5-a \
#            configs/paper/llama32_3b_instruct__pre_dpo_dpo.py /mnt/shared/pre_dpo/llama_inst
#
# Every worker gets the same command (jax.distributed discovers the coordinator from the TPU
# metadata when DPO_JAX_DISTRIBUTED=1). WORKDIR must be a path that every worker mounts (Filestore
# NFS, or a bucket mounted with gcsfuse at the same place on each worker) so that all hosts write
# one Orbax checkpoint; a gs:// URL is refused, as dpo_jax writes its files with file-system
# calls. Re-running the same command resumes; on preemption (SIGTERM) each host saves the same
# step and exits 0.
# Set REPO_URL / REF to clone a specific revision on the workers (default: copy this checkout).
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,14p' "$0"; exit 2
fi
TPU="$1"; ZONE="$2"; CONFIG="$3"; WORKDIR="$4"; shift 4
EXTRA="$*"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${REPO_URL:-}" ]; then
  # Ship this checkout to every worker.
  tar czf /tmp/dpo_jax_src.tgz -C "$HERE" --exclude=.git .
  gcloud compute tpus tpu-vm scp /tmp/dpo_jax_src.tgz "$TPU":~/dpo_jax_src.tgz \
    --zone "$ZONE" --worker=all
  FETCH="rm -rf ~/dpo_jax && mkdir -p ~/dpo_jax && tar xzf ~/dpo_jax_src.tgz -C ~/dpo_jax"
else
  FETCH="rm -rf ~/dpo_jax && git clone $REPO_URL ~/dpo_jax && git -C ~/dpo_jax checkout ${REF:-main}"
fi
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  $FETCH
  cd ~/dpo_jax
  pip install -q -e . 'jax[tpu]==0.10.2'
  export DPO_JAX_DISTRIBUTED=1
  python -m dpo_jax.main --config $CONFIG --workdir $WORKDIR --config.progress=False $EXTRA
"
