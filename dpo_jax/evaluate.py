"""Evaluation on preference pairs: summed log-probs, implicit rewards, preference accuracy.

`score_pairs` is the one scoring path behind `dpo_jax.score`, checkpoint ranking and the
trainer's held-out metrics share the same log-prob reduction (models/logprobs.py).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np

from dpo_jax import sharding
from dpo_jax.data import preference
from dpo_jax.models import core, logprobs


@functools.lru_cache(maxsize=8)
def _scorer(graphdef, chunk: int):
  @jax.jit
  def score(params, batch):
    out = logprobs.sequence_logps(core.merge(graphdef, params), batch, chunk=chunk)
    return {k: out[k] for k in ("logps", "lens")}
  return score


def map_batches(fn, examples: Sequence[preference.Tokenized], *, mesh, rules, batch_size: int,
                buckets: Sequence[int], pad_id: int, columns: dict | None = None,
                per_example: bool = False) -> dict:
  """Applies fn(batch) to every example once, in order, and gathers its outputs on the host.

  fn returns per-sequence values [2b] (gathered as {name: (chosen [N], rejected [N])}) or, with
  per_example=True, per-example values [b] (gathered as {name: [N]}). The batch size is rounded
  up to a multiple of the data×fsdp devices; fill-in rows are dropped. `columns` are per-example
  [N, 2] arrays attached to batches (e.g. cached reference log-probs).
  """
  n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
  batch_size = max(n_batch, -(-batch_size // n_batch) * n_batch)
  cols: dict[str, tuple[list, list]] = {}
  for batch in preference.eval_batches(examples, batch_size, buckets, pad_id, columns):
    valid = batch["valid"] > 0
    dev = {k: sharding.host_local_array(
        v, jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(
            ("batch",) + (None,) * (v.ndim - 1), v.shape, mesh, rules)))
        for k, v in batch.items()}
    out = sharding.to_host(fn(dev))
    b = valid.shape[0]
    for k, v in out.items():
      c, r = cols.setdefault(k, ([], []))
      if per_example:
        c.append(np.asarray(v)[valid])
      else:
        c.append(np.asarray(v[:b])[valid])
        r.append(np.asarray(v[b:])[valid])
  if per_example:
    return {k: np.concatenate(c) for k, (c, _) in cols.items()}
  return {k: (np.concatenate(c), np.concatenate(r)) for k, (c, r) in cols.items()}


def score_pairs(cfg, params, examples: Sequence[preference.Tokenized], *, mesh, rules,
                batch_size: int, buckets: Sequence[int], pad_id: int,
                chunk: int = 256) -> dict[str, np.ndarray]:
  """Summed completion log-probs and token counts of every example, in order.

  Returns chosen_logps, rejected_logps, chosen_len, rejected_len: [N] each (for unpaired
  examples the rejected fields describe the mismatched completion).
  """
  score = _scorer(core.split(cfg)[0], chunk)
  out = map_batches(lambda batch: score(params, batch), examples, mesh=mesh, rules=rules,
                    batch_size=batch_size, buckets=buckets, pad_id=pad_id)
  return {"chosen_logps": out["logps"][0], "rejected_logps": out["logps"][1],
          "chosen_len": out["lens"][0], "rejected_len": out["lens"][1]}


def implicit_rewards(policy: dict, ref: dict, beta: float) -> dict[str, np.ndarray]:
  """β·(log π − log π_ref) for chosen and rejected, and per-pair preference correctness."""
  chosen = beta * (policy["chosen_logps"] - ref["chosen_logps"])
  rejected = beta * (policy["rejected_logps"] - ref["rejected_logps"])
  return {"chosen_reward": chosen, "rejected_reward": rejected,
          "correct": (chosen > rejected).astype(np.float64)}


# ---------------------------------------------------------------------------------------------
# Ground truth: sample from the policy and score with a known reward (the synthetic task).
# ---------------------------------------------------------------------------------------------


def ground_truth(policy, baseline, prompts, reward_fn, sampling, mesh, rules) -> dict:
  """Evaluates `policy` against `baseline` (both pairs.Model) on held-out prompts.

  Samples sampling.n responses per prompt from each at temperature sampling.temperature, and
  reports the policy's mean true reward (and its standard error), the baseline's, the win rate
  of policy samples over baseline samples by true reward (ties count ½), KL(π‖π_base) estimated
  as the mean over π's samples of log π(y|x) − log π_base(y|x) (exact in expectation at
  temperature 1), and the mean response length in tokens (EOS excluded).
  """
  import dataclasses   # noqa: PLC0415
  from dpo_jax import pairs   # noqa: PLC0415
  ys = pairs.sample_responses(policy, prompts, sampling)
  ys_base = pairs.sample_responses(baseline, prompts,
                                   dataclasses.replace(sampling, seed=sampling.seed + 7919))
  r = np.array([[reward_fn(p, text) for _, text in rs] for p, rs in zip(prompts, ys)])
  rb = np.array([[reward_fn(p, text) for _, text in rs] for p, rs in zip(prompts, ys_base)])
  lp = np.array(pairs.sequence_logps(policy, prompts, ys, mesh, rules, sampling.add_bos))
  lb = np.array(pairs.sequence_logps(baseline, prompts, ys, mesh, rules, sampling.add_bos))
  stops = policy.stop_ids()
  lengths = np.array([[len([t for t in ids if t not in stops]) for ids, _ in rs] for rs in ys])
  return {"reward": float(r.mean()), "reward_sem": float(r.std() / np.sqrt(r.size)),
          "baseline_reward": float(rb.mean()),
          "win_rate": float(np.mean((r > rb) + 0.5 * (r == rb))),
          "kl": float(np.mean(lp - lb)), "length": float(lengths.mean()),
          "samples": int(r.size)}
