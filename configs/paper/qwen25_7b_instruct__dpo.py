"""Pre-DPO Table 1 cell: Qwen2.5-7B-Instruct x DPO (reference = the SFT policy).

Expected (arXiv 2504.15843 v1, Table 1): AlpacaEval 2 LC 52.2% / WR 56.8%, Arena-Hard v0.1 WR
62.9% (the SFT policy: 31.2 / 31.0 / 55.9). Hyperparameters (Table 4): beta=0.01, lr 5e-07;
global batch 128, 1 epoch, cosine, warmup 0.06, max length 4096. Data:
DtYXs/qwen2.5-7b-ultrafeedback-armorm-binarized (train). On-policy pairs: 5 samples per
UltraFeedback prompt from the Instruct model, scored by RLHFlow/ArmoRM-Llama3-8B-v0.1, best vs
worst.

    # one GPU node (all local GPUs, FSDP):
    bash experiments/launch_gpu_node.sh configs/paper/qwen25_7b_instruct__dpo.py /path/to/W
    # TPU VM pod (every worker runs the same command):
    bash experiments/launch_tpu_pod.sh TPU_NAME ZONE configs/paper/qwen25_7b_instruct__dpo.py /mnt/shared/W
    # the same on any machine:
    python -m dpo_jax.main --config configs/paper/qwen25_7b_instruct__dpo.py --workdir W
    # 2-step smoke run on local stand-ins (tests/test_paper_configs.py):
    python -m dpo_jax.main --config configs/paper/qwen25_7b_instruct__dpo.py:runlocal --workdir /tmp/w

Arguments: runlocal, init=DIR (the SFT policy to start from).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _table1  # noqa: E402


def get_config(arg=None):
  return _table1.build("qwen25_7b_instruct", "dpo", arg)
