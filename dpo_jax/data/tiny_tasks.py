"""The small preference set shipped with the package (dpo_jax/assets/tiny_prefs.jsonl).

Three string tasks with a systematic preference: chosen answers are correct, rejected answers
carry a typical error (descending instead of ascending order, off-by-one sums, unreversed
words). A model trained with DPO should rank held-out pairs correctly well above chance.

    python -m dpo_jax.data.tiny_tasks   # rewrites the asset (deterministic)
"""
import json
import os
import random

ASSET = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tiny_prefs.jsonl")
WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "maple", "ocean", "zebra",
         "candle", "forest", "mirror", "pepper", "rocket", "silver")


def make_rows(n: int, seed: int = 0) -> list[dict]:
  rng = random.Random(seed)
  rows = []
  for i in range(n):
    kind = i % 3
    if kind == 0:
      xs = rng.sample(range(10, 99), rng.randint(3, 5))
      prompt = "Sort ascending: " + " ".join(map(str, xs))
      chosen = " ".join(map(str, sorted(xs)))
      rejected = " ".join(map(str, sorted(xs, reverse=True)))
    elif kind == 1:
      a, b = rng.randint(10, 60), rng.randint(10, 39)
      prompt = f"Add {a} and {b}."
      chosen = str(a + b)
      rejected = str(a + b + rng.choice((-1, 1)))
    else:
      w = rng.choice(WORDS)
      prompt = f"Reverse the word {w}."
      chosen = w[::-1]
      rejected = w
    rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
  return rows


if __name__ == "__main__":
  with open(ASSET, "w") as f:
    for row in make_rows(600):
      f.write(json.dumps(row) + "\n")
  print(f"wrote {ASSET}")
