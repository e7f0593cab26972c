"""Preference rows -> token arrays.

Row formats (TRL's dataset formats):
  paired, strings:          {"prompt": str, "chosen": str, "rejected": str}
  paired, conversational:   {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}
                            (msgs = [{"role": ..., "content": ...}], rendered with the
                            tokenizer's chat template)
  implicit prompt:          {"chosen": ..., "rejected": ...}; the prompt is the common prefix
                            (of messages, or of text cut back to a whitespace boundary)
  unpaired:                 {"prompt": ..., "completion": ..., "label": bool}

Sources: a JSONL file, a directory written by `datasets.Dataset.save_to_disk`, a
`datasets.Dataset`, or a dataset name for `datasets.load_dataset`.

Truncation rule (applied per sequence, before batching):
  1. A prompt longer than max_prompt_length keeps its LAST max_prompt_length tokens
     (truncation_mode="keep_end", TRL's default) or its first ones ("keep_start").
  2. The completion is then cut at the end so that prompt + completion <= max_length.
  3. A row whose completion would keep no token is an error naming the row.
Prompt tokens are never scored: the loss mask covers completion tokens only.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Optional, Sequence

import numpy as np

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
  """A bad row; the message names the source, the row number and the field."""


@dataclasses.dataclass
class Tokenized:
  """Token ids of one preference example (or one unpaired example: rejected is None)."""
  prompt: list[int]
  chosen: list[int]
  rejected: Optional[list[int]] = None
  label: float = 1.0


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def load_rows(source: Any, split: str = "train") -> tuple[str, list[dict]]:
  """Returns (a name for error messages, the rows)."""
  if isinstance(source, (list, tuple)):
    return "<rows>", list(source)
  if not isinstance(source, (str, os.PathLike)):   # a datasets.Dataset or similar
    return getattr(source, "info", None) and str(source.info.dataset_name) or "<dataset>", \
        [dict(r) for r in source]
  source = os.fspath(source)
  if source.endswith((".jsonl", ".json")):
    rows = []
    with open(source) as f:
      for i, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f"{source}: row {i}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
          raise DataError(f"{source}: row {i}: expected a JSON object, got "
                          f"{type(row).__name__}")
        rows.append(row)
    return source, rows
  import datasets   # noqa: PLC0415 (heavy import, only when needed)
  if os.path.isdir(source):
    ds = datasets.load_from_disk(source)
  else:
    ds = datasets.load_dataset(source, split=split)
  if isinstance(ds, datasets.DatasetDict):
    if split not in ds:
      raise DataError(f"{source}: no split {split!r}; splits are {list(ds)}")
    ds = ds[split]
  return source, [dict(r) for r in ds]


# ---------------------------------------------------------------------------------------------
# Row formats
# ---------------------------------------------------------------------------------------------


def _is_messages(x) -> bool:
  return isinstance(x, list) and all(isinstance(m, dict) for m in x)


def _check_field(where: str, name: str, value, conversational: Optional[bool]):
  if value is None or (isinstance(value, (str, list)) and not value):
    raise DataError(f"{where}: field {name!r} is missing or empty")
  if conversational is None:
    conversational = not isinstance(value, str)
  if conversational:
    if not _is_messages(value):
      raise DataError(f"{where}: field {name!r} must be a list of messages "
                      f"{{role, content}}, got {type(value).__name__}")
    for j, m in enumerate(value):
      if m.get("role") not in ROLES:
        raise DataError(f"{where}: field {name!r} message {j}: bad role {m.get('role')!r} "
                        f"(expected one of {ROLES})")
      if not isinstance(m.get("content"), str):
        raise DataError(f"{where}: field {name!r} message {j}: content must be a string")
  elif not isinstance(value, str):
    raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
  return conversational


def _common_prefix(a, b):
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  if isinstance(a, str):
    # Cut back to a whitespace boundary so that no word is split between prompt and completion.
    while n > 0 and not a[n - 1].isspace():
      n -= 1
  return n


def normalize(row: dict, where: str) -> dict:
  """Checks a row and returns {prompt, chosen, rejected | completion+label, conversational}."""
  if not isinstance(row, dict):
    raise DataError(f"{where}: expected an object, got {type(row).__name__}")
  if "completion" in row or "label" in row:
    label = row.get("label")
    if not isinstance(label, (bool, np.bool_)):
      raise DataError(f"{where}: field 'label' must be a boolean, got {label!r}")
    conv = _check_field(where, "prompt", row.get("prompt"), None)
    _check_field(where, "completion", row.get("completion"), conv)
    return {"prompt": row["prompt"], "chosen": row["completion"], "rejected": None,
            "label": float(label), "conversational": conv}
  if "prompt" not in row and "chosen" in row and "rejected" in row:
    conv = _check_field(where, "chosen", row["chosen"], None)
    _check_field(where, "rejected", row["rejected"], conv)
    n = _common_prefix(row["chosen"], row["rejected"])
    if conv:   # the prompt is the shared messages; completions are what follows
      row = {"prompt": row["chosen"][:n], "chosen": row["chosen"][n:],
             "rejected": row["rejected"][n:]}
    else:
      row = {"prompt": row["chosen"][:n], "chosen": row["chosen"][n:],
             "rejected": row["rejected"][n:]}
    if not row["prompt"]:
      raise DataError(f"{where}: implicit-prompt row: 'chosen' and 'rejected' share no prefix")
  conv = _check_field(where, "prompt", row.get("prompt"), None)
  _check_field(where, "chosen", row.get("chosen"), conv)
  _check_field(where, "rejected", row.get("rejected"), conv)
  if row["chosen"] == row["rejected"]:
    raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical")
  if conv:
    _check_order(where, row["prompt"])
  return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
          "label": 1.0, "conversational": conv}


def _check_order(where: str, prompt: list[dict]):
  roles = [m["role"] for m in prompt]
  if "system" in roles[1:]:
    raise DataError(f"{where}: field 'prompt': a system message may only come first")
  if roles[-1] == "assistant":
    raise DataError(f"{where}: field 'prompt': the last prompt message is from the assistant")


# ---------------------------------------------------------------------------------------------
# Tokenisation and truncation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenizeOptions:
  max_length: int = 512
  max_prompt_length: int = 256
  truncation_mode: str = "keep_end"   # keep_end | keep_start
  add_bos: bool = True                # strings only; chat templates add their own


def _encode(tokenizer, text: str) -> list[int]:
  return tokenizer(text, add_special_tokens=False)["input_ids"]


def _render(tokenizer, prompt, completion, conversational: bool, add_bos: bool):
  """(prompt_ids, completion_ids) for one sequence."""
  if not conversational:
    prompt_ids = _encode(tokenizer, prompt)
    if add_bos and tokenizer.bos_token_id is not None:
      prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    completion_ids = _encode(tokenizer, completion)
    if tokenizer.eos_token_id is not None:
      completion_ids = completion_ids + [tokenizer.eos_token_id]
    return prompt_ids, completion_ids
  prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
  full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
  if not full_text.startswith(prompt_text):
    raise ValueError("the chat template renders the prompt differently inside the full "
                     "conversation; cannot split prompt and completion")
  return _encode(tokenizer, prompt_text), _encode(tokenizer, full_text[len(prompt_text):])


def truncate(prompt_ids, completion_ids, opts: TokenizeOptions, where: str, field: str):
  if len(prompt_ids) > opts.max_prompt_length:
    if opts.truncation_mode == "keep_end":
      prompt_ids = prompt_ids[-opts.max_prompt_length:]
    elif opts.truncation_mode == "keep_start":
      prompt_ids = prompt_ids[:opts.max_prompt_length]
    else:
      raise ValueError(f"config.data.truncation_mode must be keep_end or keep_start, got "
                       f"{opts.truncation_mode!r}")
  room = opts.max_length - len(prompt_ids)
  if room <= 0 or not completion_ids:
    raise DataError(f"{where}: field {field!r}: no completion token fits in max_length="
                    f"{opts.max_length} after a prompt of {len(prompt_ids)} tokens")
  return prompt_ids, completion_ids[:room]


def tokenize_rows(rows: Sequence[dict], tokenizer, opts: TokenizeOptions,
                  source: str = "<rows>", on_error: str = "fail") -> tuple[list[Tokenized], int]:
  """Validates and tokenises every row up front. Returns (examples, number of rows skipped).

  on_error="fail" raises on the first bad row; "skip" drops bad rows and counts them.
  """
  if opts.max_prompt_length >= opts.max_length:
    raise ValueError(f"config.data.max_prompt_length={opts.max_prompt_length} must be smaller "
                     f"than config.data.max_length={opts.max_length}")
  out, skipped = [], 0
  for i, row in enumerate(rows, 1):
    where = f"{source}: row {i}"
    try:
      r = normalize(row, where)
      try:
        p_ids, c_ids = _render(tokenizer, r["prompt"], r["chosen"], r["conversational"],
                                 opts.add_bos)
        r_ids = None
        if r["rejected"] is not None:
          _, r_ids = _render(tokenizer, r["prompt"], r["rejected"], r["conversational"],
                             opts.add_bos)
      except DataError:
        raise
      except Exception as e:   # a template or tokenizer failure on this row
        raise DataError(f"{where}: cannot tokenise: {e}") from None
      prompt, chosen = truncate(p_ids, c_ids, opts, where, "chosen")
      rejected = None
      if r_ids is not None:
        _, rejected = truncate(p_ids, r_ids, opts, where, "rejected")
      out.append(Tokenized(prompt, chosen, rejected, r["label"]))
    except DataError:
      if on_error == "fail":
        raise
      skipped += 1
  if not out:
    raise DataError(f"{source}: no usable rows ({skipped} skipped)")
  return out, skipped


# ---------------------------------------------------------------------------------------------
# Batching: [chosen; rejected] rows, padded to a few length buckets.
# ---------------------------------------------------------------------------------------------


def default_buckets(max_length: int, smallest: int = 32) -> tuple[int, ...]:
  """Powers of two from `smallest` up to max_length, and max_length itself.

  The step compiles once per bucket, so at most len(buckets) times (6 for max_length=1024).
  """
  out, b = [], smallest
  while b < max_length:
    out.append(b)
    b *= 2
  return tuple(out) + (max_length,)


def bucket_length(n: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if n <= b:
      return b
  raise ValueError(f"sequence of {n} tokens exceeds the largest bucket {buckets[-1]}")


def collate(examples: Sequence[Tokenized], buckets: Sequence[int], pad_id: int,
            valid: Optional[Sequence[bool]] = None) -> dict[str, np.ndarray]:
  """Stacks B examples into 2B rows: [chosen_0..chosen_{B-1}; rejected_0..rejected_{B-1}].

  Unpaired examples (rejected is None) use the second half for the mismatched completion
  (x_i, y_{i+1 mod B}) on which KTO estimates its KL reference point.
  Keys (R = 2B rows, L = bucket length):
    tokens, positions, segment_ids (0 = padding), loss_mask (1 on completion tokens),
    seq_index (which of the 2B sequences a token belongs to) : [R, L]
    valid, label : [B]
  """
  b = len(examples)
  seqs = [(e.prompt, e.chosen) for e in examples]
  if all(e.rejected is not None for e in examples):
    seqs += [(e.prompt, e.rejected) for e in examples]
  else:
    seqs += [(e.prompt, examples[(i + 1) % b].chosen) for i, e in enumerate(examples)]
  length = bucket_length(max(len(p) + len(c) for p, c in seqs), buckets)
  r = len(seqs)
  tokens = np.full((r, length), pad_id, np.int32)
  loss_mask = np.zeros((r, length), np.float32)
  segment_ids = np.zeros((r, length), np.int32)
  positions = np.zeros((r, length), np.int32)
  for i, (p, c) in enumerate(seqs):
    n = len(p) + len(c)
    tokens[i, :n] = p + c
    loss_mask[i, len(p):n] = 1.0
    segment_ids[i, :n] = 1
    positions[i, :n] = np.arange(n)
  return {
      "tokens": tokens, "positions": positions, "segment_ids": segment_ids,
      "loss_mask": loss_mask,
      "seq_index": np.broadcast_to(np.arange(r, dtype=np.int32)[:, None], (r, length)).copy(),
      "valid": np.asarray(valid if valid is not None else [True] * b, np.float32),
      "label": np.asarray([e.label for e in examples], np.float32),
  }


class Batches:
  """Batch `step` of an endless shuffled stream; a pure function of (seed, step), so a resumed
  run sees exactly the batches an uninterrupted one would."""

  def __init__(self, examples: Sequence[Tokenized], batch_size: int, seed: int,
               buckets: Sequence[int], pad_id: int, shuffle: bool = True):
    if batch_size > len(examples):
      raise ValueError(f"config.batch_size={batch_size} exceeds the {len(examples)} examples")
    self.examples, self.batch_size = list(examples), batch_size
    self.seed, self.buckets, self.pad_id, self.shuffle = seed, tuple(buckets), pad_id, shuffle
    self._perms: dict[int, np.ndarray] = {}

  def __len__(self):
    return len(self.examples)

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      n = len(self.examples)
      # A batch spans at most two epochs: keep the newest two permutations.
      self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
      self._perms[epoch] = (np.random.default_rng([self.seed, epoch]).permutation(n)
                            if self.shuffle else np.arange(n))
    return self._perms[epoch]

  def indices(self, step: int) -> list[int]:
    n = len(self.examples)
    pos = step * self.batch_size + np.arange(self.batch_size)
    return [int(self._perm(int(p // n))[p % n]) for p in pos]

  def epoch(self, step: int) -> float:
    return step * self.batch_size / len(self.examples)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    return collate([self.examples[i] for i in self.indices(step)], self.buckets, self.pad_id)


def eval_batches(examples: Sequence[Tokenized], batch_size: int, buckets: Sequence[int],
                 pad_id: int) -> Iterable[dict[str, np.ndarray]]:
  """Every example once, in order; the last batch is filled with invalid copies."""
  for start in range(0, len(examples), batch_size):
    chunk = list(examples[start:start + batch_size])
    valid = [True] * len(chunk) + [False] * (batch_size - len(chunk))
    chunk += [chunk[0]] * (batch_size - len(chunk))
    yield collate(chunk, buckets, pad_id, valid)
