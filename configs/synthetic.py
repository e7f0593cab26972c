"""The ground-truth benchmark: SFT → sampled pairs labelled by a known reward → preference
training → evaluation by the true reward (the analogue of the DPO paper's IMDb experiment).

Stages, each in W/<stage>/ (dpo_jax/data/synthetic.py describes the task):
  task      write demonstrations, train/held-out prompts and the tokenizer
  sft       train a tiny Llama from scratch on the imperfect demonstrations (loss sft)
  pairs     sample `pairs.n` responses per training prompt from the SFT model, label best vs
            worst by the true reward (optionally flipping a fraction `label_noise`)
  <method>  preference training from the SFT model (default: DPO, reference = SFT)
  evaluate  on held-out prompts: mean true reward, win rate vs SFT, KL(π‖π_SFT), length

    python -m dpo_jax.main --config configs/synthetic.py --workdir /tmp/synthetic

Expected on 2 CPU cores: a few minutes end to end (README results table).
Arguments: method=dpo|simpo|ipo|... (any loss; reference-free ones run without reference),
label_noise=<ε>, runlocal.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import ml_collections  # noqa: E402

from dpo_jax import configlib  # noqa: E402
from dpo_jax.data import synthetic  # noqa: E402

REWARD = "dpo_jax.data.synthetic:reward"


def base(arg) -> ml_collections.ConfigDict:
  """The synthetic task's shared settings (also used by experiments/)."""
  c = common.base_config()
  c.model.vocab_size = synthetic.VOCAB_SIZE
  c.model.tokenizer = "{workdir}/task/tokenizer"
  c.data.max_length = 32
  c.data.max_prompt_length = 16
  c.data.buckets = (32,)
  c.batch_size = 32
  c.log_every = 20
  c.eval_every = 100
  c.ckpt_every = 1000

  c.task = ml_collections.ConfigDict({"n_demos": 4096, "n_eval": 128, "n_val": 128})
  c.pairs = ml_collections.ConfigDict({
      "model": "{workdir}/sft", "prompts": "{workdir}/task/prompts_train.jsonl",
      "scorer": "fn:" + REWARD, "n": 4, "rule": "best_worst", "margin": 0.0,
      "label_noise": arg.label_noise, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
      "max_new_tokens": 16, "batch_size": 512, "max_prompts": 1536})
  c.evaluate = ml_collections.ConfigDict({
      "policies": ml_collections.ConfigDict(), "baseline": "{workdir}/sft",
      "prompts": "{workdir}/task/prompts_eval.jsonl", "reward": REWARD, "n": 8,
      "temperature": 1.0, "max_new_tokens": 16, "batch_size": 512})
  return c


def sft_stage(steps: int) -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict({
      "steps": steps, "data": {"train": "{workdir}/task/demos.jsonl", "eval_fraction": 0.05},
      "optim": {"lr": 3e-3, "warmup_ratio": 0.05}, "ckpt_every": steps,
      "loss": {"name": "sft"}})
  common.set_loss(s, "sft")
  return s


def preference_stage(loss: str, steps: int, **hparams) -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict({
      "steps": steps, "model": {"init": "{workdir}/sft"},
      "data": {"train": "{workdir}/pairs/pairs.jsonl", "eval_fraction": 0.05},
      "optim": {"lr": 5e-4, "warmup_ratio": 0.1}, "ckpt_every": steps,
      "loss": {"name": loss}, "log_pair_metrics": 512})
  common.set_loss(s, loss, **hparams)
  return s


def get_config(arg=None):
  arg = configlib.parse_arg(arg, method="dpo", label_noise=0.0, runlocal=False)
  c = base(arg)
  sft_steps, pref_steps = (8, 4) if arg.runlocal else (400, 150)
  if arg.runlocal:
    c.task.n_demos, c.task.n_eval, c.task.n_val = 256, 16, 16
    c.pairs.max_prompts, c.evaluate.n, c.batch_size = 64, 2, 8
    c.log_every = c.eval_every = 4
  c.evaluate.policies[arg.method] = "{workdir}/" + arg.method
  c.stages = ml_collections.ConfigDict({
      "task": {"kind": "synthetic_task"},
      "sft": sft_stage(sft_steps),
      "pairs": {"kind": "pairs"},
      arg.method: preference_stage(arg.method, pref_steps),
      "evaluate": {"kind": "evaluate"}})
  c.stage_order = ("task", "sft", "pairs", arg.method, "evaluate")
  c.lock()
  return c
