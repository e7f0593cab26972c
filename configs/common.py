"""Defaults shared by every experiment config."""
import os

import ml_collections
from ml_collections import config_dict

import dpo_jax
from dpo_jax import losses
from dpo_jax.data import preference
from dpo_jax.models.config import TINY

PACKAGE_DIR = os.path.dirname(dpo_jax.__file__)
TINY_PREFS = os.path.join(PACKAGE_DIR, "assets", "tiny_prefs.jsonl")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.steps = 200
  c.epochs = 0.0               # > 0: train this many epochs of data.train (overrides steps)
  c.batch_size = 16            # preference pairs per step (global)
  c.eval_batch_size = 0        # 0: same as batch_size
  c.grad_accum = 1             # micro-batches per step; exact (tests/test_train.py)
  c.log_every = 10             # a metrics row every this many steps (0: the last step only),
                               # holding the means over the steps since the row before
  c.eval_every = 50            # held-out metrics (eval/...) every this many steps, in a row of
                               # their own if log_every does not fall there; 0: never
  c.ckpt_every = 100
  c.keep_checkpoints = 3
  c.nonfinite = "stop"             # NaN/Inf loss or gradient: stop (naming the step) | skip
  c.logprob_chunk = 256        # sequence positions per chunk of f32 logits
  c.progress = True
  c.log_pair_metrics = 0       # >0: per-pair λ etc. of that many training pairs at step 0

  c.model = ml_collections.ConfigDict()
  c.model.init = config_dict.placeholder(str)   # HF dir or dpo_jax checkpoint; None: built-in
  c.model.tokenizer = config_dict.placeholder(str)   # None: init's tokenizer (or the byte one)
  # Built-in architecture (used when init is None; otherwise the source's config.json wins).
  for field in ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                "num_heads", "num_kv_heads", "rope_theta", "max_position_embeddings",
                "tie_word_embeddings"):
    c.model[field] = getattr(TINY, field)
  c.model.dtype = "float32"        # compute dtype
  c.model.param_dtype = "float32"  # master weights
  c.model.remat = "full"           # full | dots | none
  c.model.scan_layers = True       # False: unrolled layers (faster on CPU, longer compile)
  c.model.attention_chunk = 0      # > 0: causal attention in query chunks (long sequences:
                                   # skips the masked upper blocks, bounds the [L, L] scores)
  c.model.attention_impl = "einsum"  # einsum | xla | cudnn (jax.nn.dot_product_attention; cudnn:
                                     # fused flash attention on NVIDIA GPUs, needs bf16/fp16)

  c.data = ml_collections.ConfigDict()
  c.data.train = TINY_PREFS        # JSONL path, saved dataset dir, or dataset name
  c.data.split = "train"
  c.data.streaming = False         # True: stream what datasets.load_dataset reads (a hub name,
                                   # data files), a round of rows at a time; not cached
  c.data.eval = config_dict.placeholder(str)
  c.data.eval_split = config_dict.placeholder(str)   # None: the eval source's "test" split,
                                                     # or all its rows if it has no splits
  c.data.eval_fraction = 0.1       # held out from train when data.eval is None
  c.data.max_length = 128
  c.data.max_prompt_length = 64
  c.data.truncation_mode = "keep_end"
  c.data.add_bos = True            # string rows start with the tokenizer's BOS (False for a
                                   # model that reads none, as GPT-2-style tokenizers add none)
  c.data.buckets = ()              # () = powers of two from 32 up to max_length
  c.data.on_error = "fail"         # fail | skip (bad rows are counted)
  c.data.cache = True              # keep the tokenised data in W/data_cache (a rerun reads it)
  c.data.cache_keep = 4            # W/data_cache keeps the files written or read last (0: all)
  c.data.packing = False           # several sequences per row, segment ids (data/packing.py)
  c.data.share_prompt = False      # pack each pair as [prompt | chosen | rejected]: the prompt
                                   # is computed once (implies packing; data/packing.py)
  c.data.row_length = 0            # packed row length; 0: max_length (2·max_length when sharing)
  c.data.row_buckets = ()          # () = packing.default_row_buckets (4 per octave)
  # Logits only at completion positions, K = L/4, L/2, 3L/4 of a row's L (4; 0: every position;
  # preference.add_score_index).
  c.data.score_parts = preference.SCORE_PARTS

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "dpo"
  c.loss.beta = 0.1

  c.reference = ml_collections.ConfigDict()
  c.reference.mode = "initial"     # initial | checkpoint | none | precomputed | sync
  c.reference.path = config_dict.placeholder(str)   # checkpoint (and precomputed) source
  c.reference.dtype = "float32"    # bfloat16 halves the reference's memory
  c.reference.sync_every = 512     # TR-DPO τ (TRL's ref_model_sync_steps)
  c.reference.sync_alpha = 0.6     # TR-DPO α (TRL's ref_model_mixup_alpha)

  c.teacher = ml_collections.ConfigDict()   # daDPO's teacher (dpo_jax/teacher.py)
  c.teacher.mode = "none"          # none | step | precomputed
  c.teacher.path = config_dict.placeholder(str)
  c.teacher.dtype = "float32"

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 5e-4
  c.optim.warmup_ratio = 0.1
  c.optim.final_lr_ratio = 0.0
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.clip = 1.0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                 # -1: all remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.rules = ml_collections.ConfigDict()   # logical axis -> mesh axes overrides
  return c


def set_loss(c: ml_collections.ConfigDict, name: str, **hparams):
  """config.loss = the loss's name and every hyperparameter with its default (then overrides),
  so that --config.loss.<hparam>=... works for any loss. Reference-free losses get
  reference.mode = 'none', which skips the reference forward."""
  spec = losses.get(name)
  c.loss = ml_collections.ConfigDict({"name": name})
  for k, v in {**spec.hparams, **hparams}.items():
    if v is not None:
      c.loss[k] = v
  if not spec.needs_ref:
    if "reference" not in c:   # a partial (stage) config
      c.reference = ml_collections.ConfigDict()
    c.reference.mode = "none"
