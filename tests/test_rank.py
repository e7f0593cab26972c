"""`python -m dpo_jax.rank`: accuracies and margins against PyTorch scores; the bootstrap."""
import json

import numpy as np
import pytest

from dpo_jax import rank
from dpo_jax.data import preference
from dpo_jax.data.tokenizer import byte_tokenizer
from helpers_hf import tiny_hf_model
from test_score import ROWS, torch_logps


def test_bootstrap_intervals_and_ranking():
  rng = np.random.default_rng(0)
  n = 400
  correct = {"good": (rng.random(n) < 0.8) * 1.0, "bad": (rng.random(n) < 0.55) * 1.0}
  margins = {m: c * 2 - 1 + rng.normal(0, 0.1, n) for m, c in correct.items()}
  out = rank.bootstrap(correct, margins, 500, seed=1)
  assert [r["model"] for r in out["ranking"]] == ["good", "bad"]
  good = out["ranking"][0]
  lo, hi = good["accuracy_ci"]
  # The normal-approximation interval of a proportion, independently: p ± 1.96 sqrt(p(1-p)/n).
  p = correct["good"].mean()
  half = 1.96 * np.sqrt(p * (1 - p) / n)
  assert abs(lo - (p - half)) < 0.015 and abs(hi - (p + half)) < 0.015
  assert good["beats_next"] > 0.99
  assert rank.bootstrap(correct, margins, 500, seed=1) == out   # seeded: reproducible


def test_rank_cli_matches_torch_scores(tmp_path, monkeypatch):
  from dpo_jax import evaluate
  scored, score_pairs = [], evaluate.score_pairs   # the ids are mapped from a file
  monkeypatch.setattr(evaluate, "score_pairs", lambda cfg, params, examples, **kw: scored.append(
      type(examples.tokens.base)) or score_pairs(cfg, params, examples, **kw))
  tokenised, tokenize = [], preference.tokenize_cached
  monkeypatch.setattr(preference, "tokenize_cached",
                      lambda *a, **kw: tokenised.append(1) or tokenize(*a, **kw))
  tok = byte_tokenizer()
  models = {}
  for name, seed in (("a", 0), ("b", 1), ("ref", 2)):
    m = tiny_hf_model("llama", seed=seed, std=0.1, vocab_size=len(tok))
    m.save_pretrained(tmp_path / name)
    tok.save_pretrained(tmp_path / name)
    models[name] = m
  rows = ROWS * 3
  data = tmp_path / "pairs.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = rank.main(["--models", str(tmp_path / "a"), str(tmp_path / "b"), "--data", str(data),
                   "--ref", str(tmp_path / "ref"), "--beta", "0.5", "--bootstrap", "200",
                   "--out", str(tmp_path / "rank.json")])
  assert json.loads((tmp_path / "rank.json").read_text()) == out
  assert scored == [np.memmap] * 3   # the reference and two models, each scored once
  assert len(tokenised) == 1   # their tokenizers are the same: the rows are tokenised once
  # the same rows streamed (no fingerprint; a one-shot iterator, which can be read only once):
  # still one tokenising, and the same scores
  tokenised.clear()
  paths = [str(tmp_path / "a"), str(tmp_path / "b")]
  streamed = rank.score_models(paths, iter(rows), ref=str(tmp_path / "ref"), beta=0.5)
  assert len(tokenised) == 1
  whole = rank.score_models(paths, str(data), ref=str(tmp_path / "ref"), beta=0.5)
  for path in paths:
    np.testing.assert_array_equal(streamed[path][0], whole[path][0])
    np.testing.assert_allclose(streamed[path][1], whole[path][1], rtol=1e-6, atol=1e-6)
  for r in out["ranking"]:
    model = models[r["model"].rsplit("/", 1)[-1]]
    margins = []
    for row in rows:
      c = torch_logps(model, tok, row["prompt"], row["chosen"])[0] - torch_logps(
          models["ref"], tok, row["prompt"], row["chosen"])[0]
      j = torch_logps(model, tok, row["prompt"], row["rejected"])[0] - torch_logps(
          models["ref"], tok, row["prompt"], row["rejected"])[0]
      margins.append(0.5 * (c - j))
    margins = np.array(margins)
    np.testing.assert_allclose(r["margin"], margins.mean(), rtol=1e-4, atol=1e-4)
    assert r["accuracy"] == np.mean(margins > 0)
    assert r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1]


def test_cli_lengths_are_checked_by_flag_name(capsys):
  """score and rank refuse a prompt budget the tokenizer cannot honour before loading anything,
  naming their own flags (the trainer names config.data.*)."""
  from dpo_jax import score
  for main, args in ((score.main, ["--model", "m", "--out", "o"]), (rank.main, ["--models", "m"])):
    with pytest.raises(SystemExit) as e:
      main([*args, "--data", "d", "--max_length", "96"])
    assert e.value.code == 2
    assert "--max_prompt_length=512 must be at least 1 and smaller than --max_length=96" in (
        capsys.readouterr().err)
