"""Scores preference pairs with a model: summed log-probs, and implicit rewards with --ref.

    python -m dpo_jax.score --model DIR --data pairs.jsonl --out scores.jsonl [--ref DIR]

DIR is a Hugging Face model directory (config.json + *.safetensors + tokenizer files) or a
dpo_jax checkpoint (a workdir, W/checkpoints, or W/checkpoints/<step>). Each input row
{prompt, chosen, rejected} (strings or chat messages) gives one output row with chosen_logps,
rejected_logps (summed over completion tokens), chosen_len, rejected_len, and with --ref also
chosen_reward, rejected_reward = β·(log π − log π_ref). Prompt handling, chat templates and
truncation are exactly the trainer's (dpo_jax/data/preference.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m dpo_jax.score", description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True, help="HF model directory or dpo_jax checkpoint")
  p.add_argument("--data", required=True, help="JSONL of preference rows (or a dataset)")
  p.add_argument("--out", required=True, help="output JSONL, one row per input row")
  p.add_argument("--ref", default=None, help="reference model for implicit rewards")
  p.add_argument("--beta", type=float, default=0.1, help="β of the implicit reward")
  p.add_argument("--batch_size", type=int, default=16)
  add_tokenizing_args(p)
  p.add_argument("--dtype", default="float32",
                 help="compute dtype (float32 | bfloat16 | float16)")
  args = p.parse_args(argv)
  check_lengths(p, args)
  check_numbers(p, args)
  return args


def add_tokenizing_args(p: argparse.ArgumentParser):
  """How rows are read and tokenised: training's config.data keys of the same names."""
  p.add_argument("--max_length", type=int, default=1024)
  p.add_argument("--max_prompt_length", type=int, default=512)
  p.add_argument("--truncation_mode", default="keep_end")
  p.add_argument("--split", default="train")
  p.add_argument("--no_bos", dest="add_bos", action="store_false",
                 help="string rows without the tokenizer's BOS first (data.add_bos=False)")


def tokenize_options(args):
  from dpo_jax.data import preference   # noqa: PLC0415
  return preference.TokenizeOptions(args.max_length, args.max_prompt_length,
                                    args.truncation_mode, args.add_bos)


def check_lengths(p: argparse.ArgumentParser, args):
  """Refuses --max_prompt_length/--max_length the tokenizer cannot honour, naming the flags."""
  if not 1 <= args.max_prompt_length < args.max_length:
    p.error(f"--max_prompt_length={args.max_prompt_length} must be at least 1 and smaller than "
            f"--max_length={args.max_length}")


def check_numbers(p: argparse.ArgumentParser, args):
  """Refuses a --beta or --batch_size that would score nothing meaningful, naming the flag."""
  if not (math.isfinite(args.beta) and args.beta > 0):
    p.error(f"--beta={args.beta} must be a finite number > 0 (β <= 0 zeroes or flips the "
            "implicit rewards)")
  if args.batch_size < 1:
    p.error(f"--batch_size={args.batch_size} must be >= 1")


def check_examples(examples, vocab_size: int, pad_id: int, source: str, model: str):
  """Rows a pair score means something for: each has a rejected completion (an unpaired
  prompt/completion/label row would be scored against another row's completion), and every id
  indexes `model`'s embedding (past it the gather returns garbage and the scores turn NaN)."""
  from dpo_jax.data import preference   # noqa: PLC0415
  unpaired = np.flatnonzero(examples.lens[:, 2] < 0)
  if unpaired.size:
    raise preference.DataError(
        f"{source}: row {unpaired[0] + 1}: unpaired (prompt, completion, label), as are "
        f"{unpaired.size} of {len(examples)} rows; scoring needs (prompt, chosen, rejected) rows")
  top = preference.largest_id(examples.tokens, pad_id)
  if top >= vocab_size:
    raise ValueError(f"{model}: a vocabulary of {vocab_size} tokens, but {source} tokenised "
                     f"with this tokenizer holds token id {top}")


def main(argv=None):
  args = parse_args(argv)
  import jax   # noqa: PLC0415
  from dpo_jax import distributed, evaluate, reference, sharding, writers   # noqa: PLC0415
  from dpo_jax.data import preference   # noqa: PLC0415
  from dpo_jax.models import TINY, load   # noqa: PLC0415
  from dpo_jax.models.config import check_dtype   # noqa: PLC0415

  check_dtype(args.dtype, "--dtype")   # before any model or data is read
  distributed.maybe_initialize()
  if jax.process_index() == 0:
    print(distributed.device_line(), file=sys.stderr)
  mesh = sharding.make_mesh()
  rules = sharding.DEFAULT_RULES
  tokenizer = load.load_tokenizer(args.model)
  opts = tokenize_options(args)
  source, rows = preference.load_rows(args.data, args.split)
  # the ids go to an unlinked file in $TMPDIR a round of rows at a time, then are mapped from it
  examples, _ = preference.tokenize_cached(None, rows, tokenizer, opts, source, "fail",
                                           **distributed.tokenize_split())
  pad_id = preference.pad_id(tokenizer)
  buckets = preference.default_buckets(args.max_length)

  if args.ref:   # the reference scores the ids --model's tokenizer writes
    reference.check_tokenizer(load.load_tokenizer(args.ref), tokenizer, f"--ref {args.ref}")

  def scores(path):
    cfg = load.model_config(path, TINY, dtype=args.dtype)
    check_examples(examples, cfg.vocab_size, pad_id, source, path)
    params = load.load_params(path, cfg, mesh, rules)
    return evaluate.score_pairs(cfg, params, examples, mesh=mesh, rules=rules,
                                batch_size=args.batch_size, buckets=buckets, pad_id=pad_id)

  out = scores(args.model)
  if args.ref:
    out.update(evaluate.implicit_rewards(out, scores(args.ref), args.beta))
    out.pop("correct")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  rows = ({k: (int(v[i]) if k.endswith("_len") else float(v[i])) for k, v in out.items()}
          for i in range(len(examples)))
  # Never leave a half-written output. Every process holds all scores and writes the same file.
  writers.write_atomic(args.out, lambda f: f.writelines(json.dumps(r) + "\n" for r in rows))
  if jax.process_index() != 0:
    return
  if "chosen_reward" in out:
    acc = float(np.mean(out["chosen_reward"] > out["rejected_reward"]))
    print(f"scored {len(examples)} pairs -> {args.out}; preference accuracy {acc:.3f}",
          file=sys.stderr)
  else:
    print(f"scored {len(examples)} pairs -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
  main()
