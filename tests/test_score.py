"""`python -m dpo_jax.score` against log-probs computed independently with PyTorch."""
import json
import subprocess
import sys

import numpy as np
import torch

from dpo_jax.data.tokenizer import byte_tokenizer
from helpers import REPO, xla_env
from helpers_hf import tiny_hf_model

ROWS = [
    {"prompt": "Sort ascending: 3 1 2", "chosen": "1 2 3", "rejected": "3 2 1"},
    {"prompt": "Add 2 and 2.", "chosen": "4", "rejected": "five, I think"},
    {"prompt": [{"role": "user", "content": "Say hi."}],
     "chosen": [{"role": "assistant", "content": "hi"}],
     "rejected": [{"role": "assistant", "content": "no"}]},
]


def torch_logps(model, tokenizer, prompt, completion, bos=True):
  """Summed completion log-prob, with prompt/completion split written out independently."""
  if isinstance(prompt, str):
    p = [tokenizer.bos_token_id] * bos + tokenizer.encode(prompt, add_special_tokens=False)
    c = tokenizer.encode(completion, add_special_tokens=False) + [tokenizer.eos_token_id]
  else:
    p_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    p = tokenizer.encode(p_text, add_special_tokens=False)
    c = tokenizer.encode(full[len(p_text):], add_special_tokens=False)
  ids = torch.tensor([p + c])
  with torch.no_grad():
    logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
  tgt = ids[0, 1:]
  return float(logp[torch.arange(len(tgt)), tgt][len(p) - 1:].sum()), len(c)


def run_score(*args):
  env = xla_env()
  out = subprocess.run([sys.executable, "-m", "dpo_jax.score", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def test_score_hf_directory_matches_torch(tmp_path):
  tok = byte_tokenizer()
  policy = tiny_hf_model("llama", seed=0, std=0.1, vocab_size=len(tok))
  ref = tiny_hf_model("llama", seed=1, std=0.1, vocab_size=len(tok))
  for name, m in (("policy", policy), ("ref", ref)):
    m.save_pretrained(tmp_path / name)
    tok.save_pretrained(tmp_path / name)
  data = tmp_path / "pairs.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
  out_path = tmp_path / "scores.jsonl"
  run_score("--model", str(tmp_path / "policy"), "--data", str(data), "--out", str(out_path),
            "--ref", str(tmp_path / "ref"), "--beta", "0.5")
  scores = [json.loads(line) for line in out_path.read_text().splitlines()]
  assert len(scores) == len(ROWS)
  for row, s in zip(ROWS, scores):
    for side in ("chosen", "rejected"):
      lp, n = torch_logps(policy, tok, row["prompt"], row[side])
      lr, _ = torch_logps(ref, tok, row["prompt"], row[side])
      assert s[f"{side}_len"] == n
      np.testing.assert_allclose(s[f"{side}_logps"], lp, rtol=1e-5, atol=1e-4)
      np.testing.assert_allclose(s[f"{side}_reward"], 0.5 * (lp - lr), rtol=1e-4, atol=1e-4)


def test_score_checkpoint_equals_its_hf_export(tmp_path, monkeypatch):
  """A dpo_jax checkpoint scores the same as its export, which transformers reproduces, whatever
  dtype it was trained in. The scored ids are mapped from a file (they need not fit in memory)."""
  from dpo_jax import evaluate, export, score, train
  scored, score_pairs = [], evaluate.score_pairs
  monkeypatch.setattr(evaluate, "score_pairs", lambda cfg, params, examples, **kw: scored.append(
      type(examples.tokens.base)) or score_pairs(cfg, params, examples, **kw))
  from helpers import config
  cfg = config(steps=2, model__dtype="bfloat16")   # trained in bf16, scored in f32
  cfg.unlock()
  cfg.progress = False
  workdir = tmp_path / "w"
  train.train_and_evaluate(cfg, str(workdir))
  export.main(["--checkpoint", str(workdir), "--out", str(tmp_path / "hf")])
  data = tmp_path / "pairs.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
  for name, model in (("ckpt", workdir / "checkpoints" / "2"), ("hf", tmp_path / "hf")):
    score.main(["--model", str(model), "--data", str(data), "--out", str(tmp_path / f"{name}.jsonl")])
  a = [json.loads(line) for line in (tmp_path / "ckpt.jsonl").read_text().splitlines()]
  b = [json.loads(line) for line in (tmp_path / "hf.jsonl").read_text().splitlines()]
  assert a == b and scored == [np.memmap] * 2
  # rank, too, computes every model and the ref in one dtype (float32 unless --dtype): the
  # checkpoint and its export are one model, so its rewards against the export are all 0.
  from dpo_jax import rank
  paths = [str(workdir / "checkpoints" / "2"), str(tmp_path / "hf")]
  for correct, margin in rank.score_models(paths, str(data), ref=paths[1]).values():
    np.testing.assert_array_equal(margin, 0.0)
  import transformers
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
  tok = byte_tokenizer()
  for row, s in zip(ROWS, a):
    lp, n = torch_logps(hf, tok, row["prompt"], row["chosen"])
    assert s["chosen_len"] == n
    np.testing.assert_allclose(s["chosen_logps"], lp, rtol=1e-5, atol=1e-4)


def test_score_and_rank_report_truncation(tmp_path, capsys):
  """score and rank say how many pairs truncation cut, as training does, and score the cut
  ids: a chosen completion cut to the room left keeps no EOS."""
  from dpo_jax import rank, score
  from dpo_jax.models import TINY, hf_io, init_params
  tok = byte_tokenizer()
  hf_io.save_hf(str(tmp_path / "m"), TINY, init_params(TINY, 0), tokenizer=tok)
  data = tmp_path / "pairs.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in [
      {"prompt": "p" * 30, "chosen": "c" * 30, "rejected": "r"}, ROWS[1]]))
  out = tmp_path / "scores.jsonl"
  flags = ["--data", str(data), "--max_length", "32", "--max_prompt_length", "16"]
  score.main(["--model", str(tmp_path / "m"), "--out", str(out), *flags])
  note = (f"{data}: truncation cut 1 of 2 examples (max_length=32, max_prompt_length=16, "
          "keep_end): the prompt of 1, the chosen completion of 1")
  err = capsys.readouterr().err
  assert note in err, err
  first = json.loads(out.read_text().splitlines()[0])
  assert first["chosen_len"] == 32 - 16 and first["rejected_len"] == 2
  rank.main(["--models", str(tmp_path / "m"), "--bootstrap", "0", *flags])
  assert note in capsys.readouterr().err


def test_no_bos_scores_string_rows_without_it(tmp_path):
  """--no_bos (training's data.add_bos=False): a string row's prompt is its text alone, as torch
  scores it here; a chat row is what its template writes either way."""
  from dpo_jax import score
  tok = byte_tokenizer()
  hf = tiny_hf_model("llama", seed=0, std=0.1, vocab_size=len(tok))
  hf.save_pretrained(tmp_path / "m")
  tok.save_pretrained(tmp_path / "m")
  data = tmp_path / "pairs.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
  out = tmp_path / "scores.jsonl"
  score.main(["--model", str(tmp_path / "m"), "--data", str(data), "--out", str(out), "--no_bos"])
  scores = [json.loads(line) for line in out.read_text().splitlines()]
  for row, s in zip(ROWS, scores):
    lp, n = torch_logps(hf, tok, row["prompt"], row["chosen"], bos=False)
    assert s["chosen_len"] == n
    np.testing.assert_allclose(s["chosen_logps"], lp, rtol=1e-5, atol=1e-4)
  with_bos = torch_logps(hf, tok, ROWS[0]["prompt"], ROWS[0]["chosen"])[0]
  assert abs(with_bos - scores[0]["chosen_logps"]) > 1e-3   # the flag changed the ids
