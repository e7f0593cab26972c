"""Synthetic preference pairs: sample N responses per prompt, score them, pair them, write JSONL.

    python -m dpo_jax.pairs --model DIR --prompts prompts.jsonl --out pairs.jsonl --n 4 \\
        --scorer fn:dpo_jax.data.synthetic:reward          # a reward function (prompt, response)
        --scorer implicit --ref DIR --beta 0.1             # β·log(π/π_ref) of a DPO model
        --scorer rm:DIR                                    # a transformers reward model (PyTorch)
        [--rule best_worst | --rule margin --margin 0.2] [--label_noise 0.1]
        [--temperature 1.0 --top_p 1.0 --top_k 0 --max_new_tokens 64 --seed 0]

DIR is a Hugging Face directory or a dpo_jax checkpoint. Each prompt row is {"prompt": str or
chat messages}. best_worst pairs each prompt's highest- against its lowest-scored response
(skipped when they tie); empty responses are left out; margin takes every pair whose scores differ by at least --margin. With
--label_noise ε each pair's labels are swapped with probability ε (seeded), as in the DPO paper's
noisy-preference ablations. Output rows: {prompt, chosen, rejected, score_chosen,
score_rejected}, the format training reads.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import random
from typing import Callable, Sequence

import numpy as np

from dpo_jax import writers

SCORER_HELP = "fn:module:callable | implicit (with --ref) | rm:<HF reward model dir>"


@dataclasses.dataclass(frozen=True)
class Sampling:
  n: int = 4
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 64
  batch_size: int = 256
  seed: int = 0
  add_bos: bool = True   # string prompts start with BOS, as training's data.add_bos

  def __post_init__(self):
    for name in ("n", "max_new_tokens", "batch_size"):
      if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
        raise ValueError(f"sampling {name}={getattr(self, name)!r} must be an integer >= 1")


@dataclasses.dataclass
class Model:
  """A loaded model: config, params (on `mesh`, which sampling then splits the batch over),
  tokenizer, and its generation config (stop ids beyond config.json's)."""
  cfg: object
  params: object
  tokenizer: object
  mesh: object = None
  rules: object = None
  generation_config: object = None

  @classmethod
  def load(cls, path: str, mesh, rules, dtype: str = "float32") -> "Model":
    from dpo_jax.models import TINY, load   # noqa: PLC0415
    cfg = load.model_config(path, TINY, dtype=dtype)
    return cls(cfg, load.load_params(path, cfg, mesh, rules), load.load_tokenizer(path), mesh,
               rules, load.generation_config(path))

  def stop_ids(self) -> tuple[int, ...]:
    from dpo_jax import generate   # noqa: PLC0415
    return generate.stop_ids(self.cfg, self.tokenizer, self.generation_config)


def sample_responses(model: Model, prompts: Sequence, sampling: Sampling
                     ) -> list[list[tuple[list[int], str]]]:
  """n responses per prompt: [(completion token ids incl. EOS if emitted, text)] per prompt.
  Any of the model's stop ids (generate.stop_ids) ends a response. After a string prompt the
  text starts as it follows the prompt (preference.continuation: " word" after "... is")."""
  from dpo_jax import generate   # noqa: PLC0415
  from dpo_jax.data import preference   # noqa: PLC0415
  tok = model.tokenizer
  ids = [ids for ids in preference.encode_prompts(tok, prompts, sampling.add_bos)
         for _ in range(sampling.n)]
  pad, stops = preference.pad_id(tok), model.stop_ids()
  tokens = []
  for start in range(0, len(ids), sampling.batch_size):
    chunk = ids[start:start + sampling.batch_size]
    fill = sampling.batch_size - len(chunk)   # a fixed batch shape: one compilation
    out = generate.sample(model.cfg, model.params, chunk + [chunk[0]] * fill,
                          max_new_tokens=sampling.max_new_tokens,
                          temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k, eos_id=stops, pad_id=pad,
                          seed=sampling.seed * 1_000_003 + start, mesh=model.mesh,
                          rules=model.rules)
    tokens += [list(t) for t in out["tokens"][:len(chunk)]]
  texts = [preference.continuation(tok, prompts[i // sampling.n], ids[i],
                                   [t for t in ts if t not in stops])
           for i, ts in enumerate(tokens)]
  per = list(zip(tokens, texts))
  return [per[i * sampling.n:(i + 1) * sampling.n] for i in range(len(prompts))]


# ---------------------------------------------------------------------------------------------
# Scorers: (prompts, responses per prompt) -> scores per prompt
# ---------------------------------------------------------------------------------------------


def function_scorer(spec: str) -> Callable:
  """'module:callable' with callable(prompt, response_text) -> float."""
  module, _, name = spec.partition(":")
  fn = getattr(importlib.import_module(module), name)
  return lambda prompts, responses: [[float(fn(p, text)) for _, text in rs]
                                     for p, rs in zip(prompts, responses)]


def implicit_scorer(policy: Model, ref: Model, beta: float, mesh, rules,
                    add_bos: bool = True) -> Callable:
  """β·(log π(y|x) − log π_ref(y|x)) of each response as written (see written_examples): the
  implicit reward dpo_jax.score and the training step give the written pairs."""
  def score(prompts, responses):
    examples = written_examples(policy.tokenizer, prompts, responses, add_bos)   # once
    lp, lr = (iter(score_examples(m, examples, policy.tokenizer, mesh, rules))
              for m in (policy, ref))
    return [[beta * (next(lp) - next(lr)) if text.strip() else float("nan") for _, text in rs]
            for rs in responses]
  return score


def reward_model_scorer(path: str) -> Callable:
  """A transformers AutoModelForSequenceClassification (PyTorch, CPU) on prompt + response."""
  import torch   # noqa: PLC0415
  import transformers   # noqa: PLC0415
  rm = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
  tok = transformers.AutoTokenizer.from_pretrained(path)
  if tok.pad_token is None:   # a batch of several responses is padded
    tok.pad_token = tok.eos_token
  if rm.config.pad_token_id is None:   # the model finds each row's last token by the pad id
    rm.config.pad_token_id = tok.pad_token_id

  def text_of(prompt, response):
    if isinstance(prompt, str):   # the response starts as it follows the prompt
      return prompt + response
    return tok.apply_chat_template(list(prompt) + [{"role": "assistant", "content": response}],
                                   tokenize=False)

  def score(prompts, responses):
    out = []
    with torch.no_grad():
      for p, rs in zip(prompts, responses):
        enc = tok([text_of(p, text) for _, text in rs], return_tensors="pt", padding=True)
        out.append(rm(**enc).logits[:, 0].float().tolist())
    return out
  return score


def written_examples(tok, prompts, responses, add_bos: bool = True) -> list:
  """Each non-empty response as the written rows hold it: its text, tokenised as training and
  dpo_jax.score tokenise a completion (EOS appended, special tokens as the text has them), not
  the sampled ids (which lack EOS when cut at max_new_tokens and may not be the text's
  encoding). Empty responses, which make_pairs leaves out, are not scored."""
  from dpo_jax.data import preference   # noqa: PLC0415
  rows = [{"prompt": p, "completion": completion(p, text), "label": True}
          for p, rs in zip(prompts, responses) for _, text in rs if text.strip()]
  if not rows:
    return []
  opts = preference.TokenizeOptions(1 << 30, (1 << 30) - 1, add_bos=add_bos)
  tokenized, _ = preference.tokenize_rows(rows, tok, opts, "sampled responses", "fail")
  return [(e.prompt, e.chosen) for e in tokenized]


def score_examples(model: Model, examples, tok, mesh, rules) -> list[float]:
  """log π(y|x) summed over each (prompt ids, completion ids) example's completion. Two
  consecutive examples with one prompt are scored as one pair's two sequences, so that n
  responses to a prompt take about n sequence slots, not 2n."""
  from dpo_jax import evaluate   # noqa: PLC0415
  from dpo_jax.data import preference   # noqa: PLC0415
  if not examples:
    return []
  rows, twos, i = [], [], 0
  while i < len(examples):
    (p, y), nxt = examples[i], examples[i + 1] if i + 1 < len(examples) else None
    two = nxt is not None and list(nxt[0]) == list(p)
    rows.append(preference.Tokenized(p, y, nxt[1] if two else y))
    twos.append(two)
    i += 2 if two else 1
  longest = max(len(p) + len(y) for p, y in examples)
  out = evaluate.score_pairs(
      model.cfg, model.params, rows, mesh=mesh, rules=rules, batch_size=64,
      buckets=preference.default_buckets(max(32, longest)), pad_id=preference.pad_id(tok))
  scores = []
  for two, c, r in zip(twos, out["chosen_logps"].tolist(), out["rejected_logps"].tolist()):
    scores += [c, r] if two else [c]
  return scores


def sequence_logps(model: Model, prompts, responses, mesh, rules,
                   add_bos: bool = True) -> list[list[float]]:
  """log π(y|x) summed over each sampled completion's tokens (EOS included when emitted): the
  samples themselves, as a Monte Carlo KL estimate over them needs (evaluate.ground_truth)."""
  from dpo_jax.data import preference   # noqa: PLC0415
  tok = model.tokenizer
  examples = [(p, list(ids) or [tok.eos_token_id])
              for p, rs in zip(preference.encode_prompts(tok, prompts, add_bos), responses)
              for ids, _ in rs]
  it = iter(score_examples(model, examples, tok, mesh, rules))
  return [[next(it) for _ in rs] for rs in responses]


# ---------------------------------------------------------------------------------------------
# Pairing
# ---------------------------------------------------------------------------------------------


def make_pairs(prompts, responses, scores, *, rule: str = "best_worst", margin: float = 0.0,
               label_noise: float = 0.0, seed: int = 0) -> list[dict]:
  if rule not in ("best_worst", "margin"):
    raise ValueError(f"rule must be best_worst or margin, got {rule!r}")
  rng = random.Random(seed)
  rows = []
  for p, rs, ss in zip(prompts, responses, scores):
    # An empty response (EOS at once) cannot be a training completion: leave it out. A text
    # sampled twice is one candidate (under `margin` it would write the same pair twice).
    first = {}
    for i, (_, text) in enumerate(rs):
      if text.strip():
        first.setdefault(text, i)
    keep = sorted(first.values())
    rs, ss = [rs[i] for i in keep], [ss[i] for i in keep]
    if len(rs) < 2:
      continue
    candidates = []
    if rule == "best_worst":
      hi, lo = int(np.argmax(ss)), int(np.argmin(ss))
      if ss[hi] > ss[lo]:
        candidates.append((hi, lo))
    else:
      candidates = [(i, j) for i in range(len(rs)) for j in range(len(rs))
                    if ss[i] - ss[j] >= max(margin, 1e-12)]
    for i, j in candidates:
      if rs[i][1] == rs[j][1]:
        continue   # identical texts are no preference
      if label_noise and rng.random() < label_noise:
        i, j = j, i
      rows.append({"prompt": p, "chosen": completion(p, rs[i][1]),
                   "rejected": completion(p, rs[j][1]),
                   "score_chosen": ss[i], "score_rejected": ss[j]})
  return rows


def completion(prompt, text: str):
  """A response as a training row holds it: a string after a string prompt, one assistant
  message after chat messages (training refuses strings and messages mixed in a row)."""
  return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def write_jsonl(path: str, rows: Sequence[dict]):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  writers.write_atomic(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in rows))


def read_prompts(path: str) -> list:
  from dpo_jax.data import preference   # noqa: PLC0415
  source, rows = preference.load_rows(path)
  out = []
  for i, row in enumerate(rows, 1):
    if not isinstance(row, dict):   # a line that is not a JSON object
      raise preference.DataError(f"{source}: row {i}: "
                                 f"{getattr(row, 'message', 'expected an object')}")
    preference.check_prompt(row.get("prompt"), f"{source}: row {i}")
    out.append(row["prompt"])
  return out


def build_scorer(spec: str, model: Model, *, ref: str | None, beta: float, mesh, rules,
                 add_bos: bool = True):
  if spec.startswith("fn:"):
    return function_scorer(spec[3:])
  if spec.startswith("rm:"):
    return reward_model_scorer(spec[3:])
  if spec == "implicit":
    if not ref:
      raise ValueError("--scorer implicit needs --ref (the DPO model's reference)")
    return implicit_scorer(model, Model.load(ref, mesh, rules), beta, mesh, rules, add_bos)
  raise ValueError(f"unknown scorer {spec!r}; use {SCORER_HELP}")


def write_with_stats(out_path: str, rows: list[dict], stats: dict) -> dict:
  """Writes rows to out_path and stats to out_path.stats.json, the stats last: a stats file
  marks a finished output (pipeline stages reuse it)."""
  write_jsonl(out_path, rows)
  writers.write_atomic(out_path + ".stats.json", lambda f: json.dump(stats, f, indent=1))
  return stats


def generate_pairs(model_path: str, prompts_path: str, out_path: str, *, scorer: str,
                   sampling: Sampling, rule: str = "best_worst", margin: float = 0.0,
                   label_noise: float = 0.0, ref: str | None = None, beta: float = 0.1,
                   scorer_model: str | None = None, max_prompts: int = 0) -> dict:
  """The whole command; returns statistics (also written next to the output as .stats.json).

  scorer_model: for 'implicit', the DPO model whose implicit reward scores (default: the
  sampling model itself).
  """
  from dpo_jax import sharding   # noqa: PLC0415
  mesh, rules = sharding.make_mesh(), sharding.DEFAULT_RULES
  model = Model.load(model_path, mesh, rules)
  prompts = read_prompts(prompts_path)
  if max_prompts:
    prompts = prompts[:max_prompts]
  responses = sample_responses(model, prompts, sampling)
  scoring_model = model if not scorer_model else Model.load(scorer_model, mesh, rules)
  scores = build_scorer(scorer, scoring_model, ref=ref, beta=beta, mesh=mesh, rules=rules,
                        add_bos=sampling.add_bos)(prompts, responses)
  rows = make_pairs(prompts, responses, scores, rule=rule, margin=margin,
                    label_noise=label_noise, seed=sampling.seed)
  if not rows:
    raise ValueError("no pairs: every prompt's responses scored the same")
  flat = [s for ss in scores for s in ss]
  empty = sum(not text.strip() for rs in responses for _, text in rs)
  stats = {"prompts": len(prompts), "responses": len(flat), "empty_responses": empty,
           "pairs": len(rows),
           "mean_score": float(np.nanmean(flat)), "mean_chosen": float(np.mean(
               [r["score_chosen"] for r in rows])),
           "mean_rejected": float(np.mean([r["score_rejected"] for r in rows])),
           "label_noise": label_noise, "out": out_path}
  return write_with_stats(out_path, rows, stats)


def write_samples(model_path: str, prompts_path: str, out_path: str, *, sampling: Sampling,
                  max_prompts: int = 0) -> dict:
  """A model's responses as demonstrations {prompt, completion} (e.g. a teacher's, for dSFT)."""
  from dpo_jax import sharding   # noqa: PLC0415
  mesh, rules = sharding.make_mesh(), sharding.DEFAULT_RULES
  model = Model.load(model_path, mesh, rules)
  prompts = read_prompts(prompts_path)[:max_prompts or None]
  rows = [{"prompt": p, "completion": completion(p, text)}
          for p, rs in zip(prompts, sample_responses(model, prompts, sampling))
          for _, text in rs if text.strip()]
  return write_with_stats(out_path, rows, {"prompts": len(prompts), "rows": len(rows),
                                           "out": out_path})


def distill_pairs(teacher_path: str, student_path: str, prompts_path: str, out_path: str, *,
                  sampling: Sampling, max_prompts: int = 0) -> dict:
  """dDPO's pairs: chosen = the teacher's response, rejected = the student's (arXiv 2310.16944,
  2506.15717); identical or empty responses are left out."""
  from dpo_jax import sharding   # noqa: PLC0415
  mesh, rules = sharding.make_mesh(), sharding.DEFAULT_RULES
  prompts = read_prompts(prompts_path)[:max_prompts or None]
  one = dataclasses.replace(sampling, n=1)
  t = sample_responses(Model.load(teacher_path, mesh, rules), prompts, one)
  s = sample_responses(Model.load(student_path, mesh, rules),
                       prompts, dataclasses.replace(one, seed=sampling.seed + 1))
  rows = [{"prompt": p, "chosen": completion(p, tr[0][1]), "rejected": completion(p, sr[0][1])}
          for p, tr, sr in zip(prompts, t, s)
          if tr[0][1].strip() and sr[0][1].strip() and tr[0][1] != sr[0][1]]
  return write_with_stats(out_path, rows, {"prompts": len(prompts), "pairs": len(rows),
                                           "out": out_path})


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m dpo_jax.pairs",
                              description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True)
  p.add_argument("--prompts", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--scorer", required=True, help=SCORER_HELP)
  p.add_argument("--ref", default=None)
  p.add_argument("--beta", type=float, default=0.1)
  p.add_argument("--scorer_model", default=None, help="implicit: the DPO model (default: "
                 "--model)")
  p.add_argument("--rule", default="best_worst", choices=("best_worst", "margin"))
  p.add_argument("--margin", type=float, default=0.0)
  p.add_argument("--label_noise", type=float, default=0.0)
  p.add_argument("--max_prompts", type=int, default=0)
  for f in dataclasses.fields(Sampling):
    if f.name != "add_bos":
      p.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
  p.add_argument("--no_bos", dest="add_bos", action="store_false",
                 help="string prompts without the tokenizer's BOS first (data.add_bos=False)")
  a = p.parse_args(argv)
  sampling = Sampling(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Sampling)})
  stats = generate_pairs(a.model, a.prompts, a.out, scorer=a.scorer, sampling=sampling,
                         rule=a.rule, margin=a.margin, label_noise=a.label_noise, ref=a.ref,
                         beta=a.beta, scorer_model=a.scorer_model, max_prompts=a.max_prompts)
  print(json.dumps(stats))


if __name__ == "__main__":
  main()
