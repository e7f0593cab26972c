"""benchmarks/trl_side_by_side.py --lengths realistic: both trainers get the same tokens. (TRL
itself is an optional extra; here its rows go through the same word tokenizer TRL is given.)"""
import os
import sys

import jax
import numpy as np

from dpo_jax import bench, configlib
from helpers import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import trl_side_by_side as sbs  # noqa: E402


def test_realistic_pairs_tokenise_the_same_on_both_sides(tmp_path):
  args = sbs.parse_args(["--lengths", "realistic", "--batch", "4", "--steps", "3", "--seq", "64",
                         "--vocab", "256", "--hidden", "32", "--intermediate", "64",
                         "--layers", "1"])
  data = sbs.realistic_data(args, str(tmp_path))
  lengths = [[len(r) for r in data["trl_rows"][k]] for k in ("prompt", "chosen", "rejected")]
  assert len(lengths[0]) == data["pairs"] == 12
  # TRL's rows: completions end in the EOS word, which the word tokenizer maps to id 1.
  tok = sbs.word_tokenizer(args.vocab)
  ids = {k: [tok(t, add_special_tokens=False)["input_ids"] for t in data["trl_rows"][k]]
         for k in ("prompt", "chosen", "rejected")}
  assert all(x[-1] == 1 and 1 not in x[:-1] for k in ("chosen", "rejected") for x in ids[k])
  assert tuple(sum(map(len, ids[k])) for k in ("prompt", "chosen", "rejected")) == data["tokens"]
  seqs = [len(p) + len(c) for k in ("chosen", "rejected") for p, c in zip(ids["prompt"], ids[k])]
  assert max(seqs) <= args.seq and min(map(len, ids["chosen"] + ids["rejected"])) >= 2
  # dpo_jax's pipeline on the JSONL (it appends the EOS): the same totals, and an epoch of
  # warm-up steps leaves exactly one epoch of the same pairs to time.
  c = bench.get_config()
  for key, value in {"from_data": True, "data.train": data["jsonl"],
                     "model.tokenizer": data["tokenizer"], "model.vocab_size": args.vocab,
                     "model.hidden_size": 32, "model.intermediate_size": 64,
                     "model.num_layers": 1, "model.num_heads": 4, "model.num_kv_heads": 4,
                     "data.max_length": args.seq, "data.max_prompt_length": args.seq // 2,
                     "batch": args.batch, "warmup": args.steps, "steps": args.steps}.items():
    configlib.set_key(c, key, value)
  run, _, _ = bench.prepare_data(c, jax.devices()[:1])
  lens = run.train_data.examples.lens
  assert tuple(int(x) for x in lens.sum(0)) == data["tokens"]
  timed = [bench.sequence_tokens(run.train_data, i) for i in range(3, 6)]
  assert sum(timed) == data["sequence_tokens"]
  assert sorted(i for s in range(3, 6) for i in run.train_data.indices(s)) == list(range(12))
  assert np.all(lens[:, 0] <= args.seq // 2)
