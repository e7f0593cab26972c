"""Shared builder of configs/paper/*: the 16 cells of Pre-DPO's Table 1 (arXiv 2504.15843).

Rows (policies) x columns (methods). Hyperparameters are the paper's Table 4 (../shared/LOSSES.md);
shared settings: global batch 128, 1 epoch, cosine schedule to 0, warmup ratio 0.06, max length
4096 (prompt up to 2048, kept from the end), bf16 compute with f32 master weights, AdamW without
weight decay, full rematerialisation, FSDP over every device.

Pre-DPO cells run two stages in one config: stage1 trains the row's DPO (reference = the SFT
policy) or SimPO (reference-free) with that cell's Table 4 settings and saves it with Orbax;
stage2 restarts from the same SFT policy with stage1's checkpoint as the reference.

`runlocal` swaps in local stand-ins (the built-in tiny decoder, the byte tokenizer and a
64-row file in the same conversational layout as the real data) and runs 2 steps per stage.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import common  # noqa: E402

import ml_collections  # noqa: E402

from dpo_jax import configlib  # noqa: E402

UF = "HuggingFaceH4/ultrafeedback_binarized"
STANDIN = os.path.join(common.PACKAGE_DIR, "assets", "ultrafeedback_standin.jsonl")

# policy -> (init model, preference data, split, eval split, note)
ROWS = {
    "llama32_3b_base": dict(
        init="meta-llama/Llama-3.2-3B", data=UF, split="train_prefs", eval_split="test_prefs",
        name="Llama3.2-3B-Base-SFT",
        note=("The paper's policy is meta-llama/Llama-3.2-3B after SFT on "
              "HuggingFaceH4/ultrachat_200k; pass that SFT model as init=DIR (an HF directory "
              "or a dpo_jax checkpoint). The default init is the base model itself.")),
    "llama32_3b_instruct": dict(
        init="meta-llama/Llama-3.2-3B-Instruct",
        data="DtYXs/llama3.2-3b-ultrafeedback-armorm-binarized", split="train",
        eval_split="test", name="Llama3.2-3B-Instruct",
        note=("On-policy pairs: 5 samples per UltraFeedback prompt from the Instruct model, "
              "scored by RLHFlow/ArmoRM-Llama3-8B-v0.1, best vs worst.")),
    "qwen25_7b_base": dict(
        init="Qwen/Qwen2.5-7B", data=UF, split="train_prefs", eval_split="test_prefs",
        name="Qwen2.5-7B-Base-SFT",
        note=("The paper's policy is Qwen/Qwen2.5-7B after SFT on HuggingFaceH4/ultrachat_200k; "
              "pass that SFT model as init=DIR. The default init is the base model itself.")),
    "qwen25_7b_instruct": dict(
        init="Qwen/Qwen2.5-7B-Instruct",
        data="DtYXs/qwen2.5-7b-ultrafeedback-armorm-binarized", split="train",
        eval_split="test", name="Qwen2.5-7B-Instruct",
        note=("On-policy pairs: 5 samples per UltraFeedback prompt from the Instruct model, "
              "scored by RLHFlow/ArmoRM-Llama3-8B-v0.1, best vs worst.")),
}

# Table 4: (DPO beta, lr), (SimPO beta, gamma, lr), Pre-DPO(DPO) (beta, lr), Pre-DPO(SimPO).
TABLE4 = {
    "llama32_3b_base": dict(dpo=(0.005, 1e-6), simpo=(2.5, 1.2, 1e-6),
                            pre_dpo_dpo=(0.05, 1e-6), pre_dpo_simpo=(0.05, 6e-7)),
    "llama32_3b_instruct": dict(dpo=(0.05, 6e-7), simpo=(2.5, 1.0, 1e-6),
                                pre_dpo_dpo=(0.05, 1e-6), pre_dpo_simpo=(0.1, 1e-6)),
    "qwen25_7b_base": dict(dpo=(0.005, 8e-7), simpo=(2.5, 1.4, 8e-7),
                           pre_dpo_dpo=(0.2, 8e-7), pre_dpo_simpo=(0.2, 1e-6)),
    "qwen25_7b_instruct": dict(dpo=(0.01, 5e-7), simpo=(2.5, 1.2, 1e-6),
                               pre_dpo_dpo=(0.05, 1e-6), pre_dpo_simpo=(0.1, 6e-7)),
}

# Table 1: AlpacaEval 2 LC % / WR % / Arena-Hard v0.1 WR %.
TABLE1 = {
    "llama32_3b_base": dict(sft=(6.1, 4.0, 2.1), dpo=(10.5, 12.0, 10.6), simpo=(13.1, 13.1, 11.7),
                            pre_dpo_dpo=(12.5, 13.9, 11.9), pre_dpo_simpo=(18.1, 18.4, 14.0)),
    "llama32_3b_instruct": dict(sft=(19.0, 18.9, 18.5), dpo=(36.3, 36.9, 30.6),
                                simpo=(33.8, 29.9, 28.1), pre_dpo_dpo=(39.3, 40.9, 34.7),
                                pre_dpo_simpo=(35.0, 32.3, 30.0)),
    "qwen25_7b_base": dict(sft=(18.6, 6.9, 9.4), dpo=(24.8, 22.2, 33.1), simpo=(34.7, 31.9, 38.1),
                           pre_dpo_dpo=(27.4, 24.5, 32.6), pre_dpo_simpo=(37.2, 32.6, 41.6)),
    "qwen25_7b_instruct": dict(sft=(31.2, 31.0, 55.9), dpo=(52.2, 56.8, 62.9),
                               simpo=(51.7, 52.4, 62.4), pre_dpo_dpo=(53.3, 59.4, 68.8),
                               pre_dpo_simpo=(54.6, 55.5, 64.5)),
}

METHODS = ("dpo", "simpo", "pre_dpo_dpo", "pre_dpo_simpo")


def _set_dpo(c, beta, lr):
  common.set_loss(c, "dpo", beta=beta)
  c.optim.lr = lr


def _set_simpo(c, beta, gamma, lr):
  common.set_loss(c, "simpo", beta=beta, gamma=gamma)
  c.optim.lr = lr


def _stage(setter, *hp):
  s = ml_collections.ConfigDict()
  s.loss, s.optim, s.reference = (ml_collections.ConfigDict() for _ in range(3))
  setter(s, *hp)
  return s


def build(row: str, method: str, arg=None) -> ml_collections.ConfigDict:
  arg = configlib.parse_arg(arg, runlocal=False, init="")
  if row not in ROWS or method not in METHODS:
    raise ValueError(f"unknown Table 1 cell {row}/{method}")
  r, hp = ROWS[row], TABLE4[row]
  c = common.base_config()
  c.model.init = arg.init or r["init"]
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "full"
  # 4096-token rows: query chunks of 512 skip the masked upper blocks and keep one [512, ≤4096]
  # score block per layer instead of [4096, 4096] (tests/test_attention.py: equal outputs).
  c.model.attention_chunk = 512
  c.data.train, c.data.split = r["data"], r["split"]
  c.data.eval, c.data.eval_split = r["data"], r["eval_split"]
  c.data.eval_fraction = 0.0
  c.data.max_length, c.data.max_prompt_length = 4096, 2048
  c.data.truncation_mode = "keep_end"
  c.batch_size, c.epochs = 128, 1.0
  c.optim.warmup_ratio, c.optim.final_lr_ratio, c.optim.weight_decay = 0.06, 0.0, 0.0
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.log_every, c.eval_every, c.ckpt_every, c.keep_checkpoints = 10, 100, 100, 2
  c.log_pair_metrics = 512
  if method == "dpo":
    _set_dpo(c, *hp["dpo"])
  elif method == "simpo":
    _set_simpo(c, *hp["simpo"])
  else:   # Pre-DPO: stage1 = the guide (the row's DPO or SimPO cell), stage2 = DPO with it
    guide = method.split("_")[-1]
    _set_dpo(c, *hp[method])
    c.stages = ml_collections.ConfigDict()
    c.stages.stage1 = (_stage(_set_dpo, *hp["dpo"]) if guide == "dpo"
                       else _stage(_set_simpo, *hp["simpo"]))
    c.stages.stage2 = ml_collections.ConfigDict(
        {"reference": {"mode": "checkpoint", "path": "{workdir}/stage1"}})
    c.stage_order = ("stage1", "stage2")
  if arg.runlocal:   # local stand-ins: tiny built-in decoder, byte tokenizer, 64 local rows
    c.model.init = None
    c.model.dtype = "float32"
    c.data.train = c.data.eval = STANDIN
    c.data.split, c.data.eval_split = "train", "train"
    c.data.max_length, c.data.max_prompt_length = 128, 64
    c.batch_size, c.epochs, c.steps = 8, 0.0, 2
    c.model.num_layers, c.model.hidden_size, c.model.intermediate_size = 1, 32, 64
    c.model.attention_chunk = 64   # the same chunked path on 128-token rows
    c.log_every, c.eval_every, c.ckpt_every, c.progress = 1, 0, 2, False
    c.log_pair_metrics = 8 if "stages" in c else 0
    c.mesh.data, c.mesh.fsdp = -1, 1
  c.lock()
  return c

