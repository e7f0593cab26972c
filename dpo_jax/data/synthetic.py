"""A synthetic language with a known reward: the analogue of the DPO paper's IMDb experiment.

A prompt names one of 4 topics and three context words: "topic2 : mek dov lis". A response is a
sequence of words. Each topic has 8 good and 8 bad words; 16 neutral words belong to no topic.
The true reward of a response y to a prompt of topic t is

    r(x, y) = (#good_t(y) − #bad_t(y)) / n · min(1, n / 8),   n = number of words (r = −1 if n=0)

so it lies in [−1, 1], a response earns the maximum 1 only with ≥ 8 words that are all good for
its topic, and short responses are discounted (length cannot be gamed either way).

Demonstrations are imperfect: n ~ U{6..12} words, each good for the topic with p=0.35, bad with
p=0.2, neutral with p=0.3, or good for another topic with p=0.15; their mean reward is ≈ 0.13.
An SFT model trained on them inherits that; preference optimisation on pairs labelled by r can
raise it towards 1. Words are made-up syllable pairs, so nothing is known about them in advance.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import random

import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

from dpo_jax import writers

N_TOPICS = 4
N_GOOD = N_BAD = 8
N_NEUTRAL = 16
FULL_LENGTH = 8                 # responses shorter than this are discounted
DEMO_LENGTHS = (6, 12)
DEMO_P = {"good": 0.35, "bad": 0.2, "neutral": 0.3, "other": 0.15}
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]

_SYLLABLES = ["ka", "lo", "mi", "nu", "pe", "ro", "si", "tu", "va", "xe", "zo", "bi", "da", "fu",
              "gi", "ho"]


@functools.lru_cache(maxsize=1)
def words() -> dict:
  """{'topics': [...], 'good': [[...] per topic], 'bad': [...], 'neutral': [...]} (fixed)."""
  pool = [a + b for a, b in itertools.product(_SYLLABLES, _SYLLABLES) if a != b]
  random.Random(1234).shuffle(pool)
  it = iter(pool)
  take = lambda n: [next(it) for _ in range(n)]
  return {"topics": [f"topic{t}" for t in range(N_TOPICS)],
          "good": [take(N_GOOD) for _ in range(N_TOPICS)],
          "bad": [take(N_BAD) for _ in range(N_TOPICS)],
          "neutral": take(N_NEUTRAL)}


def vocabulary() -> list[str]:
  w = words()
  return (SPECIALS + w["topics"] + [":"] + sum(w["good"], []) + sum(w["bad"], []) +
          w["neutral"])


VOCAB_SIZE = len(SPECIALS) + N_TOPICS + 1 + N_TOPICS * (N_GOOD + N_BAD) + N_NEUTRAL   # = 89


@functools.lru_cache(maxsize=1)
def tokenizer() -> transformers.PreTrainedTokenizerFast:
  vocab = {w: i for i, w in enumerate(vocabulary())}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece(prefix="##")   # joins words with spaces
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
      unk_token="<unk>")
  assert len(fast) == VOCAB_SIZE, (len(fast), VOCAB_SIZE)
  return fast


# ---------------------------------------------------------------------------------------------
# The reward
# ---------------------------------------------------------------------------------------------


def topic_of(prompt: str) -> int:
  first = prompt.split()[0] if prompt.split() else ""
  if not first.startswith("topic") or not first[5:].isdigit():
    raise ValueError(f"not a synthetic prompt: {prompt!r}")
  return int(first[5:])


def reward(prompt: str, response: str) -> float:
  """The true reward r(x, y) in [−1, 1] (see the module docstring)."""
  t = topic_of(prompt)
  w = words()
  good, bad = set(w["good"][t]), set(w["bad"][t])
  ys = response.split()
  if not ys:
    return -1.0
  score = sum((y in good) - (y in bad) for y in ys) / len(ys)
  return score * min(1.0, len(ys) / FULL_LENGTH)


# ---------------------------------------------------------------------------------------------
# Prompts and demonstrations
# ---------------------------------------------------------------------------------------------


def all_prompts() -> list[str]:
  w = words()
  out = [f"{topic} : {' '.join(ctx)}" for topic in w["topics"]
         for ctx in itertools.combinations(w["neutral"], 3)]
  random.Random(0).shuffle(out)
  return out   # 4 · C(16, 3) = 2240 prompts


def split_prompts(n_eval: int, n_val: int = 0) -> tuple[list[str], list[str], list[str]]:
  """(train, held-out evaluation, validation) prompts: disjoint and fixed. Validation prompts
  are for choosing hyperparameters, so that the held-out numbers are not selected on."""
  prompts = all_prompts()
  return (prompts[n_eval + n_val:], prompts[:n_eval], prompts[n_eval:n_eval + n_val])


def demonstration(prompt: str, rng: random.Random) -> str:
  t = topic_of(prompt)
  w = words()
  others = [x for u in range(N_TOPICS) if u != t for x in w["good"][u]]
  groups = {"good": w["good"][t], "bad": w["bad"][t], "neutral": w["neutral"], "other": others}
  kinds, probs = zip(*DEMO_P.items())
  n = rng.randint(*DEMO_LENGTHS)
  return " ".join(rng.choice(groups[rng.choices(kinds, probs)[0]]) for _ in range(n))


def write_task(outdir: str, *, n_demos: int, n_eval: int, n_val: int = 128,
               seed: int = 0) -> dict:
  """Writes demos.jsonl {prompt, completion} (SFT data), prompts_train.jsonl,
  prompts_eval.jsonl, prompts_val.jsonl {prompt} and tokenizer/ into outdir; returns paths."""
  os.makedirs(outdir, exist_ok=True)
  train_prompts, eval_prompts, val_prompts = split_prompts(n_eval, n_val)
  rng = random.Random(seed)
  paths = {k: os.path.join(outdir, f"{k}.jsonl") for k in ("demos", "prompts_train",
                                                          "prompts_eval", "prompts_val")}
  rows = {"demos": [{"prompt": p, "completion": " " + demonstration(p, rng)}
                    for p in rng.choices(train_prompts, k=n_demos)],
          "prompts_train": [{"prompt": p} for p in train_prompts],
          "prompts_eval": [{"prompt": p} for p in eval_prompts],
          "prompts_val": [{"prompt": p} for p in val_prompts]}
  for k, path in paths.items():
    writers.write_atomic(path, lambda f, k=k: f.writelines(json.dumps(r) + "\n" for r in rows[k]))
  writers.save_tokenizer(tokenizer(), os.path.join(outdir, "tokenizer"))
  paths["tokenizer"] = os.path.join(outdir, "tokenizer")
  return paths
