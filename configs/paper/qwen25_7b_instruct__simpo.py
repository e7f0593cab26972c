"""Pre-DPO Table 1 cell: Qwen2.5-7B-Instruct x SimPO (reference-free).

Expected (arXiv 2504.15843 v1, Table 1): AlpacaEval 2 LC 51.7% / WR 52.4%, Arena-Hard v0.1 WR
62.4% (the SFT policy: 31.2 / 31.0 / 55.9). Hyperparameters (Table 4): beta=2.5, gamma=1.2, lr
1e-06; global batch 128, 1 epoch, cosine, warmup 0.06, max length 4096. Data:
DtYXs/qwen2.5-7b-ultrafeedback-armorm-binarized (train). On-policy pairs: 5 samples per
UltraFeedback prompt from the Instruct model, scored by RLHFlow/ArmoRM-Llama3-8B-v0.1, best vs
worst.

    # one GPU node (all local GPUs, FSDP):
    bash experiments/launch_gpu_node.sh configs/paper/qwen25_7b_instruct__simpo.py /path/to/W
    # TPU VM pod (every worker runs the same command):
    bash experiments/launch_tpu_pod.sh TPU_NAME ZONE configs/paper/qwen25_7b_instruct__simpo.py /mnt/shared/W
    # the same on any machine:
    python -m dpo_jax.main --config configs/paper/qwen25_7b_instruct__simpo.py --workdir W
    # 2-step smoke run on local stand-ins (tests/test_paper_configs.py):
    python -m dpo_jax.main --config configs/paper/qwen25_7b_instruct__simpo.py:runlocal --workdir /tmp/w

Arguments: runlocal, init=DIR (the SFT policy to start from).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _table1  # noqa: E402


def get_config(arg=None):
  return _table1.build("qwen25_7b_instruct", "simpo", arg)
