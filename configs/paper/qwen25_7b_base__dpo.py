"""Pre-DPO Table 1 cell: Qwen2.5-7B-Base-SFT x DPO (reference = the SFT policy).

Expected (arXiv 2504.15843 v1, Table 1): AlpacaEval 2 LC 24.8% / WR 22.2%, Arena-Hard v0.1 WR
33.1% (the SFT policy: 18.6 / 6.9 / 9.4). Hyperparameters (Table 4): beta=0.005, lr 8e-07;
global batch 128, 1 epoch, cosine, warmup 0.06, max length 4096. Data:
HuggingFaceH4/ultrafeedback_binarized (train_prefs). The paper's policy is Qwen/Qwen2.5-7B after
SFT on HuggingFaceH4/ultrachat_200k; pass that SFT model as init=DIR. The default init is the
base model itself.

    # one GPU node (all local GPUs, FSDP):
    bash experiments/launch_gpu_node.sh configs/paper/qwen25_7b_base__dpo.py /path/to/W
    # TPU VM pod (every worker runs the same command):
    bash experiments/launch_tpu_pod.sh TPU_NAME ZONE configs/paper/qwen25_7b_base__dpo.py /mnt/shared/W
    # the same on any machine:
    python -m dpo_jax.main --config configs/paper/qwen25_7b_base__dpo.py --workdir W
    # 2-step smoke run on local stand-ins (tests/test_paper_configs.py):
    python -m dpo_jax.main --config configs/paper/qwen25_7b_base__dpo.py:runlocal --workdir /tmp/w

Arguments: runlocal, init=DIR (the SFT policy to start from).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _table1  # noqa: E402


def get_config(arg=None):
  return _table1.build("qwen25_7b_base", "dpo", arg)
