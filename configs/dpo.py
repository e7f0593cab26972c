"""DPO on the preference set shipped with the package (the embedded default job).

A tiny Llama-shaped decoder (2 layers, d=64, byte tokenizer) trained from scratch with DPO,
reference = initial policy, on 540 string pairs (sorting, addition, word reversal; rejected
answers carry a systematic error), 60 held out. Expected on 2 CPU cores: about 1 min for 200
steps; held-out preference accuracy about 0.80 at step 50 and 0.83 at step 200 (see README
results table).

    python -m dpo_jax.main --config configs/dpo.py --workdir /tmp/dpo
    python -m dpo_jax.main --config configs/dpo.py:runlocal --workdir /tmp/dpo_local

Arguments: runlocal (seconds-long smoke run), loss=<registered loss name>.
"""
import sys, os  # noqa: E401

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from dpo_jax import configlib  # noqa: E402


def get_config(arg=None):
  arg = configlib.parse_arg(arg, runlocal=False, loss="dpo")
  c = common.base_config()
  common.set_loss(c, arg.loss)
  if arg.runlocal:
    c.steps = 4
    c.batch_size = 8
    c.log_every = 2
    c.eval_every = 4
    c.ckpt_every = 2
  c.lock()
  return c
