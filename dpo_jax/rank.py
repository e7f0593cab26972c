"""Ranks checkpoints by preference accuracy and implicit-reward margin on held-out pairs.

    python -m dpo_jax.rank --models A B C --data pairs.jsonl [--ref REF] [--beta 0.1]
        [--bootstrap 1000] [--out ranking.json]

Each model (a Hugging Face directory or a dpo_jax checkpoint) scores every pair. With --ref the
score is the implicit reward r = β·(log π(y) − log π_ref(y)); without it, r = log π(y) (the
policy's own preference). For each model:

  accuracy   fraction of pairs with r(chosen) > r(rejected)
  margin     mean of r(chosen) − r(rejected)

with 95% bootstrap confidence intervals (pairs resampled with replacement, the same resamples
for every model), and for each adjacent pair in the ranking the fraction of resamples in which
the higher-ranked model keeps its lead (a paired bootstrap); --bootstrap 0 gives the point
estimates alone. Models are ranked by accuracy, ties broken by margin.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from dpo_jax import score, writers


def bootstrap(correct: dict[str, np.ndarray], margins: dict[str, np.ndarray], n: int,
              seed: int = 0) -> dict:
  """Point estimates, 95% percentile intervals, and paired-bootstrap win fractions; n = 0:
  the point estimates alone (no accuracy_ci, margin_ci or beats_next)."""
  if n < 0:
    raise ValueError(f"--bootstrap={n} must be >= 0 (the number of resamples; 0: no intervals)")
  if seed < 0:
    raise ValueError(f"--seed={seed} must be >= 0")
  names = list(correct)
  n_pairs = len(next(iter(correct.values())))
  if not n_pairs:
    raise ValueError("no pairs to rank: the data holds no preference rows")
  idx = np.random.default_rng(seed).integers(0, n_pairs, size=(n, n_pairs))
  acc_bs = {m: correct[m][idx].mean(1) for m in names}
  mar_bs = {m: margins[m][idx].mean(1) for m in names}
  rows = []
  for m in names:
    row = {"model": m, "accuracy": float(correct[m].mean()), "margin": float(margins[m].mean())}
    if n:
      row["accuracy_ci"] = [float(x) for x in np.percentile(acc_bs[m], [2.5, 97.5])]
      row["margin_ci"] = [float(x) for x in np.percentile(mar_bs[m], [2.5, 97.5])]
    rows.append(row)
  rows.sort(key=lambda r: (r["accuracy"], r["margin"]), reverse=True)
  for a, b in zip(rows, rows[1:] if n else []):
    ka = acc_bs[a["model"]] + 1e-9 * mar_bs[a["model"]]   # the same tie-break as the ranking
    kb = acc_bs[b["model"]] + 1e-9 * mar_bs[b["model"]]
    a["beats_next"] = float(np.mean(ka > kb))
  for rank, r in enumerate(rows, 1):
    r["rank"] = rank
  return {"pairs": n_pairs, "bootstrap": n, "ranking": rows}


def score_models(models, data, *, ref=None, beta=0.1, batch_size=16, max_length=1024,
                 max_prompt_length=512, truncation_mode="keep_end", split="train",
                 dtype="float32", add_bos=True):
  """{model: (correct [N] 0/1, margin [N])} from dpo_jax's scoring path; every model and the
  ref compute in `dtype` (a checkpoint's own training dtype would mix numerics with an HF
  directory's)."""
  from dpo_jax import distributed, evaluate, sharding   # noqa: PLC0415
  from dpo_jax.data import preference   # noqa: PLC0415
  from dpo_jax.models import TINY, load   # noqa: PLC0415
  distributed.maybe_initialize()
  mesh, rules = sharding.make_mesh(), sharding.DEFAULT_RULES
  source, rows = preference.load_rows(data, split)
  opts = preference.TokenizeOptions(max_length, max_prompt_length, truncation_mode, add_bos)
  buckets = preference.default_buckets(max_length)
  cache, tokenised = {}, {}   # tokenised: by tokenizing_key, so models that share a tokenizer
                              # (checkpoints of one run) share one tokenising of the rows

  def scores(path):
    if path not in cache:
      tok = load.load_tokenizer(path)
      # the rows are the same for every model (a stream too): the tokenizer decides
      key = preference.tokenizing_key(tok, opts, "fail") or path   # the same on every process
      if key not in tokenised:   # into $TMPDIR, mapped back
        tokenised[key] = preference.tokenize_cached(None, rows, tok, opts, source, "fail",
                                                    **distributed.tokenize_split())[0]
      examples = tokenised[key]
      cfg = load.model_config(path, TINY, dtype=dtype)
      pad = preference.pad_id(tok)
      score.check_examples(examples, cfg.vocab_size, pad, source, path)
      cache[path] = evaluate.score_pairs(cfg, load.load_params(path, cfg, mesh, rules),
                                         examples, mesh=mesh, rules=rules,
                                         batch_size=batch_size, buckets=buckets, pad_id=pad)
    return cache[path]

  base = scores(ref) if ref else None
  out = {}
  for m in models:
    s = scores(m)
    if base is not None:
      r = evaluate.implicit_rewards(s, base, beta)
      chosen, rejected = r["chosen_reward"], r["rejected_reward"]
    else:
      chosen, rejected = s["chosen_logps"], s["rejected_logps"]
    out[m] = ((chosen > rejected).astype(np.float64), (chosen - rejected).astype(np.float64))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m dpo_jax.rank", description=__doc__.split("\n")[0])
  p.add_argument("--models", nargs="+", required=True)
  p.add_argument("--data", required=True, help="held-out preference pairs (JSONL or dataset)")
  p.add_argument("--ref", default=None, help="reference for implicit rewards")
  p.add_argument("--beta", type=float, default=0.1)
  p.add_argument("--bootstrap", type=int, default=1000,
                 help="resamples for the 95%% intervals (0: point estimates only)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch_size", type=int, default=16)
  score.add_tokenizing_args(p)
  p.add_argument("--dtype", default="float32",
                 help="compute dtype of every model and the ref (float32 | bfloat16 | float16)")
  p.add_argument("--out", default=None, help="write the ranking as JSON")
  a = p.parse_args(argv)
  score.check_lengths(p, a)
  score.check_numbers(p, a)
  if a.bootstrap < 0:
    p.error(f"--bootstrap={a.bootstrap} must be >= 0 (the number of resamples; 0: no intervals)")
  if a.seed < 0:
    p.error(f"--seed={a.seed} must be >= 0")
  from dpo_jax.models.config import check_dtype   # noqa: PLC0415
  check_dtype(a.dtype, "--dtype")
  import jax   # noqa: PLC0415  (after parsing: --help and flag errors stay fast)
  scored = score_models(a.models, a.data, ref=a.ref, beta=a.beta, batch_size=a.batch_size,
                        max_length=a.max_length, max_prompt_length=a.max_prompt_length,
                        truncation_mode=a.truncation_mode, split=a.split, dtype=a.dtype,
                        add_bos=a.add_bos)
  result = bootstrap({m: c for m, (c, _) in scored.items()},
                     {m: g for m, (_, g) in scored.items()}, a.bootstrap, a.seed)
  result["score"] = "implicit reward" if a.ref else "log-prob"
  if a.out:   # every process holds the same ranking and writes the same file
    writers.write_atomic(a.out, lambda f: json.dump(result, f, indent=1))
  if jax.process_index() != 0:
    return result
  if not a.bootstrap:
    print(f"{result['pairs']} pairs, score = {result['score']}, no bootstrap (no intervals)")
    print("| rank | model | accuracy | margin |\n|---|---|---|---|")
    for r in result["ranking"]:
      print(f"| {r['rank']} | {r['model']} | {r['accuracy']:.3f} | {r['margin']:.3f} |")
    return result
  print(f"{result['pairs']} pairs, score = {result['score']}, {a.bootstrap} bootstrap "
        "resamples (95% intervals)")
  print("| rank | model | accuracy | margin | P(beats next) |\n|---|---|---|---|---|")
  for r in result["ranking"]:
    print(f"| {r['rank']} | {r['model']} | {r['accuracy']:.3f} "
          f"[{r['accuracy_ci'][0]:.3f}, {r['accuracy_ci'][1]:.3f}] | {r['margin']:.3f} "
          f"[{r['margin_ci'][0]:.3f}, {r['margin_ci'][1]:.3f}] | "
          f"{r.get('beats_next', float('nan')):.2f} |")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
