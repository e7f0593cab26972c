"""Pre-DPO Table 1 cell: Llama3.2-3B-Base-SFT x Pre-DPO, guide = SimPO.

Expected (arXiv 2504.15843 v1, Table 1): AlpacaEval 2 LC 18.1% / WR 18.4%, Arena-Hard v0.1 WR
14.0% (the SFT policy: 6.1 / 4.0 / 2.1). Hyperparameters (Table 4): stage2 DPO beta=0.05, lr
6e-07; stage1 guide = the SimPO cell (beta=2.5, gamma=1.2, lr 1e-06); global batch 128, 1 epoch,
cosine, warmup 0.06, max length 4096. Data: HuggingFaceH4/ultrafeedback_binarized (train_prefs).
The paper's policy is meta-llama/Llama-3.2-3B after SFT on HuggingFaceH4/ultrachat_200k; pass
that SFT model as init=DIR (an HF directory or a dpo_jax checkpoint). The default init is the
base model itself.

    # one GPU node (all local GPUs, FSDP):
    bash experiments/launch_gpu_node.sh configs/paper/llama32_3b_base__pre_dpo_simpo.py /path/to/W
    # TPU VM pod (every worker runs the same command):
    bash experiments/launch_tpu_pod.sh TPU_NAME ZONE configs/paper/llama32_3b_base__pre_dpo_simpo.py /mnt/shared/W
    # the same on any machine:
    python -m dpo_jax.main --config configs/paper/llama32_3b_base__pre_dpo_simpo.py --workdir W
    # 2-step smoke run on local stand-ins (tests/test_paper_configs.py):
    python -m dpo_jax.main --config configs/paper/llama32_3b_base__pre_dpo_simpo.py:runlocal --workdir /tmp/w

Arguments: runlocal, init=DIR (the SFT policy to start from).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _table1  # noqa: E402


def get_config(arg=None):
  return _table1.build("llama32_3b_base", "pre_dpo_simpo", arg)
