"""Preference rows -> token arrays.

Row formats (TRL's dataset formats):
  paired, strings:          {"prompt": str, "chosen": str, "rejected": str}
  paired, conversational:   {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}
                            (msgs = [{"role": ..., "content": ...}], rendered with the
                            tokenizer's chat template: the prompt with
                            add_generation_prompt=True, the completion is the rest of the render
                            of prompt + completion)
  implicit prompt:          {"chosen": ..., "rejected": ...} (no prompt, or prompt null); the
                            prompt is the common prefix (the shared leading messages, or the
                            shared text cut back to a whitespace boundary)
  unpaired:                 {"prompt": ..., "completion": ..., "label": bool}
  demonstrations (SFT):     {"prompt": ..., "completion": ...} (no label: desirable)
One data set is either paired or unpaired; a row of the other kind is a bad row.

Sources: a JSONL file (.jsonl, or .json holding JSON lines or one JSON array), a .parquet /
.csv / .arrow file, a directory written by `datasets.Dataset.save_to_disk` or
`DatasetDict.save_to_disk`, any other directory or name for `datasets.load_dataset`, a
`datasets.Dataset`, a `datasets.DatasetDict` (the `split` is taken), a
`datasets.IterableDataset` (or IterableDatasetDict: streamed, a round of rows at a time), or a
list of dicts.

Row numbers in error messages are 1-based: the line number in a JSONL file (blank lines are
skipped but counted, so the number is what an editor shows), otherwise the row's index + 1.
Per-row errors are raised by `tokenize_rows` (so that on_error="skip" can drop them), including
a JSONL line that is not valid JSON or not an object: `load_rows` keeps such a line as a
placeholder that fails validation.

Truncation rule (applied per sequence, before batching):
  1. A prompt longer than max_prompt_length keeps its LAST max_prompt_length tokens
     (truncation_mode="keep_end", TRL's default) or its first ones ("keep_start").
  2. The completion is then cut at the end so that prompt + completion <= max_length.
  3. A row whose completion would keep no token is an error naming the row.
Each example records what was cut (Examples.cut: CUT_PROMPT | CUT_CHOSEN | CUT_REJECTED, and
CUT_SAME when the cut completions are equal), and truncation_note() says how many were, so that
the trainer, score and rank report it.
Prompt tokens are never scored: the loss mask covers completion tokens only (for strings the
completion ends with the tokenizer's EOS, which is scored).
"""
from __future__ import annotations

import array
import codecs
import collections.abc
import dataclasses
import hashlib
import io
import itertools
import json
import mmap
import os
import re
import sys
import tempfile
import weakref
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from dpo_jax import writers

ROLES = ("system", "user", "assistant", "tool")
ON_ERROR = ("fail", "skip")
TRUNCATION_MODES = ("keep_end", "keep_start")
CUT_PROMPT, CUT_CHOSEN, CUT_REJECTED = 1, 2, 4   # Examples.cut: what truncate() cut
CUT_SAME = 8   # ... and it left chosen and rejected the same ids (a pair with no preference)
_KINDS = {True: "paired (prompt, chosen, rejected)",
          False: "unpaired (prompt, completion, label)"}


class DataError(ValueError):
  """A bad row; the message names the source, the row number and the field."""


@dataclasses.dataclass
class Tokenized:
  """Token ids of one preference example (or one unpaired example: rejected is None)."""
  prompt: list[int]
  chosen: list[int]
  rejected: Optional[list[int]] = None
  label: float = 1.0
  cut: int = dataclasses.field(default=0, compare=False)   # CUT_* flags: what truncation cut


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


class _LazyRows(collections.abc.Sequence):
  """Rows read when they are indexed: each process of a shared tokenising
  (distributed.tokenize_split) parses or converts only its own rows. `read(j)` gives row j;
  `numbers` are the rows' numbers for error messages (JSONL lines), `fingerprint` a hash of their
  source (tokenize_cached's key)."""

  def __init__(self, count: int, read, numbers=None, fingerprint=None):
    self._count, self._read, self.fingerprint = count, read, fingerprint
    if numbers is not None:
      self.numbers = numbers

  def __len__(self) -> int:
    return self._count

  def __getitem__(self, j):
    if isinstance(j, slice):
      return [self[i] for i in range(len(self))[j]]
    return self._read(range(len(self))[j])   # IndexError past the end, as a list


@dataclasses.dataclass(frozen=True)
class _BadRow:
  """A JSONL line that could not be read as an object; fails in normalize()."""
  message: str


def _parse_line(line: str, file_line: Optional[int] = None):
  """A JSON-lines line, or an element of a JSON array that starts on line `file_line` of its file
  (its errors then say where in the file: an element may span lines)."""
  try:
    return _object(json.loads(line))
  except json.JSONDecodeError as e:
    if file_line is None:
      return _BadRow(f"invalid JSON ({e.msg} at column {e.colno})")
    at = file_line + e.lineno - 1
    where = (f"line {at} of the file, column {e.colno} of the element" if e.lineno == 1 else
             f"line {at} column {e.colno} of the file")
    return _BadRow(f"invalid JSON ({e.msg} at {where})")


def _object(value):
  return value if isinstance(value, dict) else _BadRow(
      f"expected a JSON object, got {type(value).__name__}")


def _read_line(f, start: int, end: int, file_line: Optional[int] = None):
  """The row on bytes start:end of the file f (read with pread: no shared offset): a JSON-lines
  file's line, or an element of a file's JSON array that starts on line `file_line`."""
  what = "line" if file_line is None else "element"
  data = os.pread(f.fileno(), end - start, start)
  if len(data) != end - start:
    return _BadRow(f"the file was cut short after it was indexed ({len(data)} of {end - start} "
                   f"bytes of the {what} left)")
  try:
    line = data.decode("utf-8")
  except UnicodeDecodeError as e:
    return _BadRow(f"not UTF-8 text ({e.reason} at byte {e.start + 1} of the {what})")
  return _parse_line(line, file_line)


def _read_jsonl(path: str):
  """A JSON-lines file's rows, indexed instead of held: one pass hashes the file and notes where
  each non-blank line starts and ends (24 bytes a line); a row is read from the file, which stays
  open as long as the rows, and parsed when it is indexed, so the rows need not fit in memory. A
  .json file that holds one JSON array is indexed the same way, an element a row (24 bytes an
  element). A UTF-8 BOM is skipped."""
  f = open(path, "rb")   # noqa: SIM115 (closed with the rows, or below)
  try:
    rows = _json_array(f) if path.endswith(".json") else None
    if rows is None:
      rows = _json_lines(f)
    if path.endswith(".json") and len(rows) and isinstance(rows[0], _BadRow):
      _refuse_one_object(path, f)
  except BaseException:
    f.close()
    raise
  weakref.finalize(rows, f.close)
  return rows


def _refuse_one_object(path: str, f):
  """A .json file whose first line is no row and which holds one JSON object spanning lines
  (e.g. {"data": [rows]}) is named as such, not as invalid JSON on its first line."""
  try:
    value = json.loads(os.pread(f.fileno(), os.fstat(f.fileno()).st_size, 0).decode("utf-8-sig"))
  except (json.JSONDecodeError, UnicodeDecodeError):
    return   # the first line's own error says what is wrong
  if isinstance(value, dict):
    lists = [k for k, v in value.items() if isinstance(v, list)]
    raise DataError(f"{path}: holds one JSON object (keys {list(value)[:8]}), not rows; a .json "
                    f"source holds JSON lines or one JSON array of row objects"
                    + (f" (the rows may be its {lists[0]!r} list: save that list alone)"
                       if lists else ""))


def _json_lines(f):
  """The rows of the JSON-lines file f, indexed (_read_jsonl)."""
  h, at = hashlib.sha256(), 0
  starts, ends, numbers = array.array("q"), array.array("q"), array.array("q")
  for i, line in enumerate(f, 1):   # split at b"\n" only: U+2028 is not a newline
    h.update(line)
    bom = len(codecs.BOM_UTF8) if i == 1 and line.startswith(codecs.BOM_UTF8) else 0
    if line[bom:].decode("utf-8", "replace").strip():
      starts.append(at + bom)
      ends.append(at + len(line) - line.endswith(b"\n"))
      numbers.append(i)
    at += len(line)
  return _LazyRows(len(starts), lambda j: _read_line(f, starts[j], ends[j]), numbers,
                   h.hexdigest())


_JSON_BRACKETS = re.compile(rb"[\[\]{},]")
_JSON_SPACE = re.compile(rb"[ \t\n\r]*")


def _json_array(f):
  """The rows of a .json file that holds one JSON array, indexed: one pass over the mapped file
  finds where each element starts and ends (at the array's top level: strings are skipped whole
  and brackets counted) and hashes it; an element is read from the file and parsed when it is
  indexed. None when the file does not hold one array (it holds JSON lines)."""
  head = f.read(1 << 16)
  f.seek(0)
  if not head.removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"["):
    return None
  with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
    spans = _array_spans(m, len(codecs.BOM_UTF8) if head.startswith(codecs.BOM_UTF8) else 0)
    digest = None if spans is None else hashlib.sha256(m).hexdigest()
  if spans is None:
    return None
  starts, ends, lines = spans
  return _LazyRows(len(starts), lambda j: _read_line(f, starts[j], ends[j], lines[j]),
                   range(1, len(starts) + 1), digest)


def _array_spans(m, at: int):
  """(starts, ends, lines) of the top-level elements of the JSON array in m from byte `at` (lines:
  the line of the file where each starts, for error messages), or None if m is not one array (a
  string or the array left open, anything but spaces before or after it, or an array closed by
  "}"). Strings are skipped whole, found with find() rather than a regular
  expression (2.5x faster on chat rows: most of the bytes are in strings), and brackets are
  counted. Each element's JSON is checked when it is parsed: if every element parses, the
  brackets matched and the file is the array json.loads reads."""
  depth, starts, ends, lines = 0, array.array("q"), array.array("q"), array.array("q")
  counted, line = 0, 1   # line: the line of byte `counted`

  def element(start: int, end: int):
    nonlocal counted, line
    line += m[counted:start].count(b"\n")   # an element's bytes at most, copied
    counted = start
    starts.append(start)
    ends.append(end)
    lines.append(line)

  pos = start = _JSON_SPACE.match(m, at).end()
  if m[pos:pos + 1] != b"[":
    return None
  while True:
    quote = m.find(b'"', pos)
    for t in _JSON_BRACKETS.finditer(m, pos, len(m) if quote < 0 else quote):
      c = m[t.start()]
      if c == ord(","):
        if depth == 1:
          element(start, t.start())
          start = t.end()
      elif c in b"]}":
        depth -= 1
        if depth == 0:
          if c != ord("]"):
            return None   # "[}": inner brackets are checked with the elements, not this one
          if starts or _JSON_SPACE.match(m, start).end() != t.start():   # not "[ ]"
            element(start, t.start())
          return (starts, ends, lines) if _JSON_SPACE.match(m, t.end()).end() == len(m) else None
      else:
        depth += 1
        if depth == 1:
          start = t.end()
    if quote < 0:
      return None   # the array is left open
    pos = _string_end(m, quote)
    if pos is None:
      return None


def _string_end(m, quote: int):
  """The index after the JSON string that opens at m[quote], or None: the file ends inside it."""
  end = quote
  while True:
    end = m.find(b'"', end + 1)
    if end < 0:
      return None
    before = end - 1
    while m[before] == ord("\\"):   # m[quote] is a quote: this stops there at the latest
      before -= 1
    if (end - 1 - before) % 2 == 0:   # an even number of backslashes escape each other
      return end + 1


class _Stream(collections.abc.Iterable):
  """Rows without random access (a datasets.IterableDataset): each pass iterates the source
  again, converting a row to a dict when it comes. tokenize_rows reads a round of rows at a time,
  so the rows need not fit in memory. A one-shot iterator can be read once."""

  def __init__(self, source):
    self._source, self._once = source, iter(source) is source
    self._read = False

  def __iter__(self):
    if self._once and self._read:
      raise DataError("these rows came from a one-shot iterator, already read: pass a list, a "
                      "datasets.Dataset or a datasets.IterableDataset to read them again")
    self._read = True
    return (dict(r) if isinstance(r, collections.abc.Mapping) else r   # else: a row error
            for r in self._source)


def _dataset_rows(ds):
  """A datasets.Dataset's rows as dicts, converted from Arrow one at a time when read (the
  table stays memory-mapped); any other iterable of rows (an IterableDataset) streamed."""
  import datasets   # noqa: PLC0415 (heavy import, only when needed)
  if isinstance(ds, datasets.Dataset):
    return _LazyRows(len(ds), lambda j: dict(ds[j]),
                     fingerprint=getattr(ds, "_fingerprint", None))
  return _Stream(ds)


def _dataset_name(ds, default: str) -> str:
  name = getattr(getattr(ds, "info", None), "dataset_name", None)
  return str(name) if name else default


def _pick_split(name: str, ds, split: str):
  if split not in ds:
    raise DataError(f"{name}: no split {split!r}; splits are {list(ds)}")
  return f"{name}[{split}]", ds[split]


def _check_unsplit(name: str, split: str, strict: bool):
  """A source without splits has all its rows in one "train" split (as datasets.load_dataset
  names a file's rows); asking it for another split is an error when `strict`, not a silent
  read of every row (an eval split that is the training rows)."""
  if strict and split != "train":
    raise DataError(f"{name}: has no splits (all its rows are one 'train' split), but split "
                    f"{split!r} was asked of it (config.data.split, config.data.eval_split or "
                    f"--split); give a source that has it, or leave the split at its default")


def load_rows(source: Any, split: str = "train", streaming: bool = False,
              strict: bool = True) -> tuple[str, Iterable[dict]]:
  """Returns (a name for error messages, the rows). JSON lines and `datasets` rows are parsed or
  converted when indexed, so a process that tokenises a part of them reads only that part. An
  IterableDataset is streamed: its rows are read when tokenize_rows iterates them, a round at a
  time. streaming=True streams what datasets.load_dataset reads (a hub name, a directory of data
  files, a .parquet/.csv/.arrow file) instead of converting it to a local Arrow table first.
  A source without splits (a file, a list, a Dataset) is the "train" split; `split` another
  name is an error unless strict=False (a default split, which such a source ignores)."""
  if isinstance(source, (list, tuple)):
    _check_unsplit("<rows>", split, strict)
    return "<rows>", list(source)
  if isinstance(source, collections.abc.Mapping):   # a datasets.DatasetDict: one split of it
    name, ds = _pick_split(_dataset_name(next(iter(source.values()), None), "<dataset>"),
                           source, split)
    return name, _dataset_rows(ds)
  if not isinstance(source, (str, os.PathLike)):   # a datasets.Dataset or similar
    name = _dataset_name(source, "<dataset>")
    _check_unsplit(name, split, strict)
    return name, _dataset_rows(source)
  source = os.fspath(source)
  if not os.path.exists(source) and (os.path.isabs(source) or source.startswith(
      ("./", "../", "~")) or os.path.splitext(source)[1] in (".jsonl", ".json", ".parquet",
                                                              ".csv", ".arrow")):
    raise DataError(f"{source}: no such file or directory (a path, not a hub dataset name)")
  if source.endswith((".jsonl", ".json")) and not os.path.isdir(source):
    _check_unsplit(source, split, strict)
    return source, _read_jsonl(source)
  import datasets   # noqa: PLC0415 (heavy import, only when needed)
  builders = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
  ext = os.path.splitext(source)[1]
  if os.path.isfile(source) and ext not in builders:
    raise DataError(f"{source}: a file of type {ext or '(none)'!r} is not a data format; use "
                    ".jsonl, .json, .parquet, .csv or .arrow, a save_to_disk directory, a "
                    "directory of data files or a hub dataset name")
  if os.path.isfile(source):
    _check_unsplit(source, split, strict)
    ds = datasets.load_dataset(builders[ext], data_files=source, split="train",
                               streaming=streaming)
  elif os.path.isdir(source) and any(os.path.exists(os.path.join(source, f)) for f in (
      "dataset_dict.json", "state.json")):   # written by save_to_disk
    ds = datasets.load_from_disk(source)
    if not isinstance(ds, datasets.DatasetDict):
      _check_unsplit(source, split, strict)
  else:   # a hub name, or a directory of data files
    ds = datasets.load_dataset(source, split=split, streaming=streaming)
  if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
    source, ds = _pick_split(source, ds, split)
  return source, _dataset_rows(ds)


# ---------------------------------------------------------------------------------------------
# Row formats
# ---------------------------------------------------------------------------------------------


def _is_messages(x) -> bool:
  return isinstance(x, list) and all(isinstance(m, dict) for m in x)


def _check_text(where: str, what: str, s: str):
  try:
    s.encode("utf-8")
  except UnicodeEncodeError:
    raise DataError(f"{where}: {what} is not valid unicode text (lone surrogate)") from None


def _check_field(where: str, name: str, value, conversational: Optional[bool]):
  if value is None or (isinstance(value, (str, list)) and not value):
    raise DataError(f"{where}: field {name!r} is missing or empty")
  if conversational is None:
    if not isinstance(value, (str, list)):
      raise DataError(f"{where}: field {name!r} must be a string or a list of messages "
                      f"{{role, content}}, got {type(value).__name__}")
    conversational = isinstance(value, list)
  if conversational:
    if not _is_messages(value):
      raise DataError(f"{where}: field {name!r} must be a list of messages "
                      f"{{role, content}}, got {type(value).__name__}")
    for j, m in enumerate(value):
      role = m.get("role")
      if not isinstance(role, str) or role not in ROLES:
        raise DataError(f"{where}: field {name!r} message {j}: bad role {role!r} "
                        f"(expected one of {ROLES})")
      if not isinstance(m.get("content"), str):
        raise DataError(f"{where}: field {name!r} message {j}: content must be a string, got "
                        f"{type(m.get('content')).__name__}")
      _check_text(where, f"field {name!r} message {j} content", m["content"])
  elif not isinstance(value, str):
    raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
  else:
    _check_text(where, f"field {name!r}", value)
  return conversational


def _common_prefix(a, b):
  """Length of the common prefix of two sequences. Of two strings, cut back to a
  word boundary so that no word is split, and before the spaces there: the completion then
  starts with " word", as a tokenizer that merges a space into the next word encodes it."""
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  if isinstance(a, str):
    while n > 0 and not a[n - 1].isspace():
      n -= 1
    while n > 0 and a[n - 1] == " ":
      n -= 1
  return n


def normalize(row: dict, where: str) -> dict:
  """Checks a row and returns {prompt, chosen, rejected | completion+label, conversational}.

  Unpaired rows come back with the completion as "chosen" and rejected=None.
  """
  if isinstance(row, _BadRow):
    raise DataError(f"{where}: {row.message}")
  if not isinstance(row, collections.abc.Mapping):
    raise DataError(f"{where}: expected an object with fields prompt/chosen/rejected or "
                    f"prompt/completion/label, got {type(row).__name__}")
  if "completion" in row or "label" in row:
    label = row.get("label", True)   # TRL's prompt-completion (SFT) rows have no label
    if not isinstance(label, (bool, np.bool_)):
      raise DataError(f"{where}: field 'label' must be a boolean, got {label!r}")
    conv = _check_field(where, "prompt", row.get("prompt"), None)
    _check_field(where, "completion", row.get("completion"), conv)
    if conv:
      _check_order(where, row["prompt"], {"completion": row["completion"]})
    return {"prompt": row["prompt"], "chosen": row["completion"], "rejected": None,
            "label": float(label), "conversational": conv}
  prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
  if (isinstance(prompt, str) and isinstance(chosen, list) and isinstance(rejected, list)
      and chosen and isinstance(chosen[0], collections.abc.Mapping)
      and chosen[0].get("role") != "assistant"):
    # UltraFeedback-binarized layout: a string prompt, and conversations that repeat it as the
    # user turn. The conversations' common prefix is the prompt; it must end with that text.
    n = _common_prefix(chosen, rejected)
    if n == 0 or not isinstance(chosen[n - 1], collections.abc.Mapping) or (
        str(chosen[n - 1].get("content", "")).strip() != prompt.strip()):
      raise DataError(f"{where}: field 'prompt' is a string but 'chosen' and 'rejected' are "
                      "conversations whose shared prefix does not end with that prompt")
    prompt = None
  if prompt is None and "chosen" in row and "rejected" in row:   # implicit prompt
    conv = _check_field(where, "chosen", chosen, None)
    _check_field(where, "rejected", rejected, conv)
    if chosen == rejected:
      raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical")
    n = _common_prefix(chosen, rejected)
    if n == 0:
      raise DataError(f"{where}: field 'prompt' is missing and 'chosen' and 'rejected' share "
                      f"no common prefix to use as the prompt")
    prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
  conv = _check_field(where, "prompt", prompt, None)
  _check_field(where, "chosen", chosen, conv)
  _check_field(where, "rejected", rejected, conv)
  if chosen == rejected:
    raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical")
  if conv:
    _check_order(where, prompt, {"chosen": chosen, "rejected": rejected})
  return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
          "label": 1.0, "conversational": conv}


def _check_order(where: str, prompt: list[dict], completions: dict[str, list[dict]]):
  roles = [m["role"] for m in prompt]
  if "system" in roles[1:]:
    raise DataError(f"{where}: field 'prompt': a system message may only come first")
  if roles[-1] == "assistant":
    raise DataError(f"{where}: field 'prompt': the last prompt message is from the assistant")
  for name, msgs in completions.items():
    if any(m["role"] == "system" for m in msgs):
      raise DataError(f"{where}: field {name!r}: a system message may only come first in the "
                      f"prompt")
    if msgs[0]["role"] != "assistant":
      raise DataError(f"{where}: field {name!r}: the completion must start with an assistant "
                      f"message, got {msgs[0]['role']!r}")


# ---------------------------------------------------------------------------------------------
# Tokenisation and truncation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenizeOptions:
  max_length: int = 512
  max_prompt_length: int = 256
  truncation_mode: str = "keep_end"   # keep_end | keep_start
  add_bos: bool = True                # strings only; chat templates add their own


def _messages(msgs: list[dict]) -> list[dict]:
  # Rows from `datasets` carry every key of the unified message struct, absent ones as None.
  return [{k: v for k, v in m.items() if v is not None} for m in msgs]


def pad_id(tokenizer) -> int:
  """The id that fills padding: the tokenizer's pad token, else its EOS, else 0. Padding is
  masked out of attention and the loss, so any id serves; this one keeps batches readable."""
  if tokenizer.pad_token_id is not None:
    return tokenizer.pad_token_id
  return tokenizer.eos_token_id or 0


# Text whose ids two tokenizers must agree on before one model reads the other's ids.
PROBE = ("The quick brown fox jumps over the lazy dog. 0123456789 +-*/=<>()[]{} \n\t "
         "naïve café Straße 東京 😀 def f(x): return x**2")


def same_encoding(a, b) -> bool:
  """Whether two tokenizers give the same ids for a probe text and the same BOS/EOS: one model
  may then read ids the other's tokenizer wrote (an equal vocabulary size is not enough: Llama 2
  and Mistral 7B both have 32,000 tokens)."""
  enc = lambda tok: (list(tok.encode(PROBE, add_special_tokens=False)), tok.bos_token_id,
                     tok.eos_token_id)
  return enc(a) == enc(b)


def check_prompt(prompt, where: str) -> bool:
  """A prompt on its own (to sample from) passes the checks a training row's prompt passes:
  text, or messages with known roles, a system message only first, not ending with the
  assistant. Returns whether it is a conversation."""
  conv = _check_field(where, "prompt", prompt, None)
  if conv:
    _check_order(where, prompt, {})
  return conv


def encode_prompts(tokenizer, prompts: Sequence, add_bos: bool = True) -> list[list[int]]:
  """Prompts' token ids exactly as training sees them (for sampling from them), encoded in one
  batched tokenizer call."""
  chats = [check_prompt(p, f"prompt {i}") for i, p in enumerate(prompts)]
  texts = [_render(tokenizer, p, [], chat)[0] for p, chat in zip(prompts, chats)]
  return [_split(tokenizer, [ids], chat, add_bos)[0]
          for ids, chat in zip(_encode_many(tokenizer, texts), chats)]


def continuation(tokenizer, prompt, prompt_ids: list[int], ids: list[int]) -> str:
  """The text of `ids` sampled after a prompt, as a training row holds it: after a string
  prompt, what decoding prompt and ids together adds to the prompt's text (a word's leading
  space, say), so that prompt + text reads as the model wrote it; after chat messages, the
  assistant's content."""
  if isinstance(prompt, str):
    whole = tokenizer.decode(list(prompt_ids) + list(ids), skip_special_tokens=True)
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    if whole.startswith(head):
      return whole[len(head):]
  return tokenizer.decode(ids, skip_special_tokens=True)


def encode_prompt(tokenizer, prompt, add_bos: bool = True) -> list[int]:
  """One prompt's token ids exactly as training sees them (encode_prompts)."""
  return encode_prompts(tokenizer, [prompt], add_bos)[0]


def _render(tokenizer, prompt, completions: list, conversational: bool) -> list[str]:
  """The texts one row encodes: [prompt, prompt + completion, ...]. A conversation's prompt is
  rendered through the chat template with the generation prompt, each completion as the full
  conversation; _split divides the ids where they part."""
  if not conversational:
    return [prompt, *(prompt + c for c in completions)]
  prompt = _messages(prompt)
  prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
  texts, base = [prompt_text], None
  for completion in completions:
    full_text = tokenizer.apply_chat_template(prompt + _messages(completion), tokenize=False)
    if not full_text.startswith(prompt_text):   # e.g. a generation prompt that opens <think>
      if base is None:
        base = tokenizer.apply_chat_template(prompt, tokenize=False)
      if not full_text.startswith(base):
        raise ValueError("the chat template renders the prompt's messages differently once a "
                         "completion follows them; cannot split prompt and completion")
    texts.append(full_text)
  return texts


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
  """Every text's ids in one call (a fast tokenizer encodes a batch on all its threads)."""
  if not texts:
    return []
  return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _split(tokenizer, encoded: list[list[int]], conversational: bool, add_bos: bool):
  """(prompt ids, [completion ids, ...]) from _render's texts encoded. Each sequence is its
  whole text encoded at once (a completion's first token may merge with, or take a word prefix
  after, the prompt's end): the prompt is the ids every sequence shares with the prompt's own,
  the completions the rest. String rows get BOS before the prompt and EOS after each completion
  unless already there (chat templates write their own)."""
  prompt_ids, *fulls = encoded
  k = min((_common_prefix(prompt_ids, f) for f in fulls), default=len(prompt_ids))
  prompt_ids, completions = prompt_ids[:k], [f[k:] for f in fulls]
  if not conversational:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if add_bos and bos is not None and prompt_ids[:1] != [bos]:
      prompt_ids = [bos] + prompt_ids
    if eos is not None:
      completions = [c if c[-1:] == [eos] else c + [eos] for c in completions]
  return prompt_ids, completions


def _check_options(opts: TokenizeOptions):
  if opts.truncation_mode not in TRUNCATION_MODES:
    raise ValueError(f"config.data.truncation_mode must be keep_end or keep_start, got "
                     f"{opts.truncation_mode!r}")
  if opts.max_prompt_length < 1:
    raise ValueError(f"config.data.max_prompt_length={opts.max_prompt_length} must be >= 1")
  if opts.max_prompt_length >= opts.max_length:
    raise ValueError(f"config.data.max_prompt_length={opts.max_prompt_length} must be smaller "
                     f"than config.data.max_length={opts.max_length}")


def truncate(prompt_ids, completion_ids, opts: TokenizeOptions, where: str, field: str,
             head: int = 0):
  """(prompt ids, completion ids) within the options' lengths (the module's truncation rule).
  keep_end keeps the prompt's first `head` ids too (its BOS, which the model has always read
  first) when max_prompt_length leaves room for more than them."""
  prompt_ids, completion_ids = list(prompt_ids), list(completion_ids)
  if not prompt_ids:   # the first completion token is predicted from the last prompt token
    raise DataError(f"{where}: field 'prompt': no prompt token precedes the completion (the "
                    "prompt encodes to none, or they merge with the completion's first; with "
                    "config.data.add_bos=False nothing else starts the sequence)")
  if opts.truncation_mode not in TRUNCATION_MODES:
    raise ValueError(f"config.data.truncation_mode must be keep_end or keep_start, got "
                     f"{opts.truncation_mode!r}")
  keep = max(opts.max_prompt_length, 0)
  if len(prompt_ids) > keep:
    if opts.truncation_mode == "keep_end":
      head = min(head, keep - 1)
      prompt_ids = prompt_ids[:head] + prompt_ids[len(prompt_ids) - keep + head:]
    else:
      prompt_ids = prompt_ids[:keep]
  room = opts.max_length - len(prompt_ids)
  if room <= 0 or not completion_ids:
    raise DataError(f"{where}: field {field!r}: no completion token fits in max_length="
                    f"{opts.max_length} after a prompt of {len(prompt_ids)} tokens")
  return prompt_ids, completion_ids[:room]


def truncation_note(examples: Examples, opts: TokenizeOptions, source: str) -> Optional[str]:
  """One line saying how many of the examples truncation cut, and what it cut in how many;
  None when it cut none."""
  cut = examples.cut
  n = int(np.count_nonzero(cut))
  if not n:
    return None
  paired = bool((examples.lens[:, 2] >= 0).any())
  parts = (("prompt", CUT_PROMPT), ("chosen completion" if paired else "completion", CUT_CHOSEN),
           ("rejected completion", CUT_REJECTED))
  what = [f"the {name} of {k}" for name, flag in parts
          if (k := int(np.count_nonzero(cut & flag)))]
  if same := int(np.count_nonzero(cut & CUT_SAME)):   # the loss sees no preference in these
    what.append(f"and left chosen and rejected the same in {same}")
  return (f"{source}: truncation cut {n} of {len(examples)} examples "
          f"(max_length={opts.max_length}, max_prompt_length={opts.max_prompt_length}, "
          f"{opts.truncation_mode}): {', '.join(what)}")


ROUND_ROWS = 4096   # rows tokenised (by all processes together) between two stores of examples


def tokenize_rows(rows: Iterable[dict], tokenizer, opts: TokenizeOptions,
                  source: str = "<rows>", on_error: str = "fail", part: tuple[int, int] = (0, 1),
                  exchange=None, spill_dir: Optional[str] = None,
                  round_rows: int = ROUND_ROWS) -> tuple[Examples, int]:
  """Validates and tokenises every row up front. Returns (examples, number of rows skipped).

  on_error="fail" raises on the first bad row; "skip" drops bad rows and counts them.
  The first good row decides whether the data set is paired or unpaired.

  The rows go in rounds of `round_rows`: each round's good examples are stored before the next
  round starts, in memory, or with `spill_dir` in a file there (deleted as soon as it is opened,
  so nothing is left behind) whose ids come back mapped: then only a round's ids and 20 bytes an
  example are held in memory, and the data set need not fit. Rows without random access (a
  load_rows stream of a datasets.IterableDataset) are read a round at a time, so they need not
  fit either.

  Shared work (several processes, distributed.tokenize_split()): process i of n tokenises rows
  i, i + n, ... (part=(i, n)) and `exchange` hands every process all n parts (bytes) of a round,
  so each process gets every example, and the same errors, after tokenising 1/n of the rows.
  Every process must hold the same rows: a round in which they read different numbers of rows
  is an error in every process.
  """
  if on_error not in ON_ERROR:
    raise ValueError(f"config.data.on_error must be fail or skip, got {on_error!r}")
  _check_options(opts)
  index, count = part
  if (exchange is None) != (count == 1):
    raise ValueError(f"part={part} with exchange={exchange}: a part of the rows needs an "
                     f"exchange, and all rows none")
  per = count * max(1, -(-round_rows // count))   # a multiple of count: row j is process j % n's
  sink, skipped, kind = (_Builder() if spill_dir is None else _Sink(spill_dir)), 0, None
  try:
    for r, (held, numbers, todo, size) in enumerate(_rounds(rows, per, index, count)):
      mine = dataclasses.replace(tokenize_part(held, tokenizer, opts, source, numbers, todo),
                                 round_rows=size)
      parts = [mine]
      if exchange is not None:
        parts = [mine if p == index else unpack_part(blob)
                 for p, blob in enumerate(exchange(pack_part(mine)))]
        _check_round(parts, r, per, source)
      kept, bad, kind = collect(parts, numbers, source, on_error, kind)
      sink.extend(kept)
      skipped += bad
      del held, mine, parts, kept   # the round is stored: hold none of it during the next
    examples = sink.build()
  finally:
    sink.close()
  if not len(examples):
    raise DataError(f"{source}: no usable rows ({skipped} skipped)")
  return examples, skipped


def _rounds(rows, per: int, index: int, count: int):
  """For each round of `per` rows: (rows, their numbers, todo, size). Process `index` of `count`
  tokenises rows[j] for j in todo, named row numbers[j]; size is the round's row count. The last
  round is short (empty when `per` divides the rows), so that processes holding the same rows
  end together, and processes holding different ones find out (_check_round) instead of
  waiting on each other. A sequence is indexed where it is; any other iterable (a _Stream) is
  read a round at a time, each process reading every row and tokenising its own."""
  if isinstance(rows, collections.abc.Sequence):
    numbers = getattr(rows, "numbers", None)
    if numbers is None or len(numbers) != len(rows):
      numbers = range(1, len(rows) + 1)
    for start in range(0, len(rows) + 1, per):
      stop = min(start + per, len(rows))
      yield rows, numbers, range(start + index, stop, count), stop - start
    return
  it = iter(rows)
  for start in itertools.count(0, per):
    held = list(itertools.islice(it, per))
    size = len(held)
    yield held, range(start + 1, start + size + 1), range(index, size, count), size
    del held   # before the next round's rows are read: one round is held at a time
    if size < per:
      return


def _check_round(parts: Sequence[Part], r: int, per: int, source: str):
  sizes = [p.round_rows for p in parts]
  if len(set(sizes)) > 1:
    raise DataError(f"{source}: the processes read different rows: in rows {r * per + 1} to "
                    f"{(r + 1) * per}, processes 0..{len(sizes) - 1} read {sizes} rows (every "
                    f"process must read the same data set in the same order)")


CACHE_FORMAT = "dpo_jax examples 4"   # change when Examples or tokenising changes


def tokenize_cached(cache_dir: Optional[str], rows, tokenizer, opts: TokenizeOptions,
                    source: str = "<rows>", on_error: str = "fail", part: tuple[int, int] = (0, 1),
                    exchange=None, keep: int = 0) -> tuple[Examples, int]:
  """tokenize_rows, kept in cache_dir/<key>.npz: a rerun (a resumed job) reads the examples
  instead of tokenising again. After writing a file, cache_dir keeps the `keep` files written or
  read last (0: every file). The key hashes the rows' source (a JSONL or JSON file's bytes, a
  dataset's fingerprint, a list's JSON), the tokenizer (its tokenizer.json, chat template, BOS
  and EOS), the options and on_error; without a source hash or a fast tokenizer nothing is cached.

  The token ids come back mapped from the file, also right after writing it: processes on one
  host share one copy in the page cache, and the ids need not fit in memory. They need not while
  they are tokenised either, with or without a cache: tokenize_rows stores them a round of rows
  at a time in a file in the temporary directory ($TMPDIR: host-local scratch, where cache_dir
  may be on a network file system).
  Several processes (exchange given) agree on reading the cache: all read it, or all tokenise.
  Process 0 of `part` prints truncation_note (stderr) when truncation cut any example.
  """
  key = cache_key(rows, tokenizer, opts, on_error) if cache_dir else None
  if cache_dir and key is None:
    print(f"{source}: the tokenised rows are not kept in {cache_dir}, so a rerun tokenises them "
          f"again. Only rows that can be hashed (a JSONL or JSON file, a datasets.Dataset or a "
          f"list, not a stream) and tokenised by a fast tokenizer are kept", file=sys.stderr)
  path = None if key is None else os.path.join(cache_dir, f"{key[:32]}.npz")
  cached = None if path is None else _read_examples(path)
  if exchange is not None and path is not None:   # tokenize_rows is collective: all or none
    if not all(b == b"1" for b in exchange(b"0" if cached is None else b"1")):
      cached = None
  if cached is None:
    examples, skipped = tokenize_rows(rows, tokenizer, opts, source, on_error, part, exchange,
                                      spill_dir=tempfile.gettempdir())
    cached = examples, skipped
    if path is not None:
      writers.write_npz(path, {"tokens": examples.tokens, "lens": examples.lens,
                               "labels": examples.labels, "starts": examples.starts,
                               "cut": examples.cut, "skipped": np.int64(skipped)})
      writers.prune(cache_dir, keep)
      cached = _read_examples(path) or cached
  note = truncation_note(cached[0], opts, source)
  if note and part[0] == 0:
    print(note, file=sys.stderr)
  return cached


def _read_examples(path: str) -> Optional[tuple[Examples, int]]:
  """tokenize_cached's file as (examples with mapped ids, skipped), or None."""
  z = writers.read_npz(path, mapped=("tokens",))
  if z is None or not {"tokens", "lens", "labels", "starts", "cut", "skipped"} <= set(z):
    return None
  try:
    out = (Examples(z["tokens"], z["lens"], z["labels"], z["starts"], narrow=False, cut=z["cut"]),
           int(z["skipped"]))
  except ValueError as e:
    print(f"{path}: not a readable cache ({e}); computing it again", file=sys.stderr)
    return None
  try:
    os.utime(path)   # used now: writers.prune keeps the files used last
  except OSError:
    pass
  return out


def cache_key(rows, tokenizer, opts: TokenizeOptions, on_error: str) -> Optional[str]:
  """tokenize_cached's key, or None when the rows or the tokenizer cannot be hashed."""
  data = getattr(rows, "fingerprint", None)
  if data is None and isinstance(rows, (list, tuple)):
    try:
      data = hashlib.sha256(json.dumps(list(rows), sort_keys=True).encode()).hexdigest()
    except (TypeError, ValueError):
      return None
  return None if data is None else tokenizing_key(tokenizer, opts, on_error, data)


def tokenizing_key(tokenizer, opts: TokenizeOptions, on_error: str,
                   data: str = "") -> Optional[str]:
  """A hash of how rows are tokenised (the tokenizer's tokenizer.json, class, chat template, BOS
  and EOS, the options and on_error) and of `data`, or None without a fast tokenizer. The same
  on every process. Two tokenizers with one key tokenise any rows alike."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None:
    return None
  h = hashlib.sha256()
  for part in (CACHE_FORMAT, data, backend.to_str(), type(tokenizer).__name__,
               repr(getattr(tokenizer, "chat_template", None)),
               repr((tokenizer.bos_token_id, tokenizer.eos_token_id)),
               repr(dataclasses.astuple(opts)), on_error):
    h.update(part.encode() + b"\0")
  return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Part:
  """tokenize_part's results, one entry per row it was given, in order."""
  index: np.ndarray            # [m] int64: the row's index in the data set
  paired: np.ndarray           # [m] int8: 1 paired, 0 unpaired, -1 not known (did not normalise)
  errors: list                 # [m] the row's error message, or None
  examples: Examples           # the rows without an error, in order
  round_rows: int = -1         # the rows of the round it is a part of (tokenize_rows)


ENCODE_BLOCK = 64   # rows rendered, then encoded in one batched tokenizer call


def tokenize_part(rows, tokenizer, opts, source, numbers, todo: range) -> Part:
  """Tokenises the rows whose indices are in `todo` (e.g. range(i, len(rows), n): process i of
  n), ENCODE_BLOCK rows at a time: each row is validated and rendered to texts, then the block's
  texts are encoded in one call. If that call fails, each row is encoded alone, so the error
  names its row."""
  js, paired, errors, good = [], [], [], _Builder()
  for a in range(0, len(todo), ENCODE_BLOCK):
    block = [(j, f"{source}: row {numbers[j]}") for j in todo[a:a + ENCODE_BLOCK]]
    rendered = [_render_row(rows[j], tokenizer, where) for j, where in block]
    texts = [t for _, r in rendered if not isinstance(r, str) for t in r[0]]
    try:
      ids = iter(_encode_many(tokenizer, texts))
    except Exception:   # noqa: BLE001 (one row's text: each row is encoded alone below)
      ids = None
    for (j, where), (kind, r) in zip(block, rendered):
      if not isinstance(r, str):
        r = _finish_row(r, ids, tokenizer, opts, where)
      js.append(j)
      paired.append(-1 if kind is None else int(kind))
      errors.append(r if isinstance(r, str) else None)
      if errors[-1] is None:
        good.add(r)
  return Part(np.array(js, np.int64), np.array(paired, np.int8), errors, good.build())


def _render_row(row, tokenizer, where: str):
  """(paired: bool | None, (texts, normalised row) | error message) for one row."""
  try:
    r = normalize(row, where)
  except DataError as e:
    return None, str(e)
  paired = r["rejected"] is not None
  completions = [r["chosen"]] + ([r["rejected"]] if paired else [])
  try:
    return paired, (_render(tokenizer, r["prompt"], completions, r["conversational"]), r)
  except Exception as e:   # noqa: BLE001 (a template failure on this row)
    return paired, f"{where}: cannot tokenise: {type(e).__name__}: {e}"


def _finish_row(rendered, ids, tokenizer, opts, where: str):
  """A rendered row's Tokenized, or its error message: its ids are the next ones of `ids`, or,
  when the block's batched call failed (ids None), encoded here alone."""
  texts, r = rendered
  try:
    encoded = ([next(ids) for _ in texts] if ids is not None
               else _encode_many(tokenizer, texts))
  except Exception as e:   # noqa: BLE001 (a tokenizer failure on this row)
    return f"{where}: cannot tokenise: {type(e).__name__}: {e}"
  prompt_ids, completions = _split(tokenizer, encoded, r["conversational"], opts.add_bos)
  paired = r["rejected"] is not None
  head = int(tokenizer.bos_token_id is not None and prompt_ids[:1] == [tokenizer.bos_token_id])
  try:
    prompt, chosen = truncate(prompt_ids, completions[0], opts, where,
                              "chosen" if paired else "completion", head)
    rejected = (truncate(prompt_ids, completions[1], opts, where, "rejected", head)[1]
                if paired else None)
  except DataError as e:
    return str(e)
  cut = ((len(prompt) < len(prompt_ids)) * CUT_PROMPT
         + (len(chosen) < len(completions[0])) * CUT_CHOSEN
         + (paired and len(rejected) < len(completions[1])) * CUT_REJECTED)
  cut |= CUT_SAME * (paired and cut != 0 and chosen == rejected)
  return Tokenized(prompt, chosen, rejected, r["label"], int(cut))


def collect(parts: Sequence[Part], numbers, source: str, on_error: str,
            kind: Optional[int] = None) -> tuple[Examples, int, Optional[int]]:
  """Applies on_error and the one-kind rule to the rows of every part, in row order. `kind` is
  the data set's kind from earlier rows (1 paired, 0 unpaired, None: no good row yet). Returns
  (the good examples, the rows skipped, the kind after these rows)."""
  offsets = np.cumsum([0] + [len(p.examples) for p in parts])
  rows = sorted((j, p, k) for p, part in enumerate(parts)
                for k, j in enumerate(part.index.tolist()))
  kinds = [part.paired.tolist() for part in parts]
  at = [(np.cumsum([e is None for e in part.errors], dtype=np.int64) - 1).tolist()
        for part in parts]   # item k of part p is example at[p][k] of that part
  keep, skipped = [], 0
  for j, p, k in rows:
    paired, error = kinds[p][k], parts[p].errors[k]
    if paired >= 0 and kind is not None and paired != kind:   # before its own error
      error = (f"{source}: row {numbers[j]}: a {_KINDS[bool(paired)]} row in a data set of "
               f"{_KINDS[bool(kind)]} rows")
    if error is not None:
      if on_error == "fail":
        raise DataError(error)
      skipped += 1
      continue
    keep.append(offsets[p] + at[p][k])
    kind = paired
  examples = Examples.concat([p.examples for p in parts])
  if np.array_equal(keep, np.arange(len(examples))):   # every example, in order
    return examples, skipped, kind
  return examples.take(keep), skipped, kind


def pack_part(part: Part) -> bytes:
  """A Part as bytes (numpy arrays, no pickle) for the exchange."""
  buf = io.BytesIO()
  ex = part.examples.compact()
  np.savez(buf, index=part.index, paired=part.paired, lens=ex.lens, tokens=ex.tokens,
           labels=ex.labels, cut=ex.cut,
           errors=np.frombuffer(json.dumps(part.errors).encode(), np.uint8),
           round_rows=np.int64(part.round_rows))
  return buf.getvalue()


def unpack_part(blob: bytes) -> Part:
  z = np.load(io.BytesIO(blob), allow_pickle=False)
  return Part(z["index"], z["paired"], json.loads(z["errors"].tobytes().decode()),
              Examples(z["tokens"], z["lens"], z["labels"], cut=z["cut"]), int(z["round_rows"]))


class Examples(collections.abc.Sequence):
  """Tokenized examples held as arrays: every example's prompt, chosen and rejected ids one after
  another in a flat token array (uint16 when every id fits, else int32), with [N, 3] lengths
  (rejected -1: unpaired), [N] labels, [N] starts (where each example's ids begin) and [N] cut
  (uint8 CUT_* flags: what truncation cut; zeros when not given). A Python
  list of ids costs 36 bytes a token above id 256; this costs 2 or 4, and the parts of a shared
  tokenising are exchanged as they are.

  examples[i] is a Tokenized (lists of ints). examples[slice or index array] and take() are
  Examples on the same token array (no ids copied, so a view of a mapped cache stays mapped);
  compact() copies the ids into an array of their own, in order.
  """
  COMPACT_BLOCK = 4096   # examples gathered at a time by compact()

  def __init__(self, tokens: np.ndarray, lens: np.ndarray, labels: np.ndarray,
               starts: Optional[np.ndarray] = None, narrow: bool = True,
               cut: Optional[np.ndarray] = None):
    """starts None: the examples follow each other in `tokens`. narrow=False keeps the tokens'
    dtype (uint16 or int32) without reading them to choose it."""
    tokens = np.asarray(tokens)
    if narrow:
      tokens = _narrow(tokens)
    elif tokens.dtype not in (np.uint16, np.int32) or tokens.ndim != 1:
      raise ValueError(f"token ids must be a flat uint16 or int32 array, got {tokens.dtype} "
                       f"{tokens.shape}")
    self.tokens = tokens
    self.lens = np.asarray(lens, np.int32).reshape(-1, 3)
    self.labels = np.asarray(labels, np.float64).reshape(-1)
    self.sizes = sizes = np.maximum(self.lens, 0).sum(1, dtype=np.int64)   # ids an example
    self.cut = (np.zeros(len(self.lens), np.uint8) if cut is None
                else np.asarray(cut, np.uint8).reshape(-1))
    if not len(self.labels) == len(self.cut) == len(self.lens):
      raise ValueError(f"{len(self.lens)} lengths, {len(self.labels)} labels and "
                       f"{len(self.cut)} cut flags")
    if starts is None:
      if sizes.sum() != self.tokens.size:
        raise ValueError(f"{len(self.lens)} lengths for {self.tokens.size} tokens "
                         f"({sizes.sum()} expected)")
      self.starts = np.cumsum(sizes) - sizes
    else:
      self.starts = np.asarray(starts, np.int64).reshape(-1)
      if (len(self.starts) != len(self.lens) or (self.starts < 0).any()
          or (self.starts + sizes > self.tokens.size).any()):
        raise ValueError(f"{len(self.starts)} starts for {len(self.lens)} examples do not lie "
                         f"within {self.tokens.size} tokens")

  @classmethod
  def of(cls, examples: Sequence[Tokenized]) -> Examples:
    """examples as an Examples (itself when it is one)."""
    if isinstance(examples, Examples):
      return examples
    b = _Builder()
    for e in examples:
      b.add(e)
    return b.build()

  @classmethod
  def concat(cls, parts: Sequence[Examples]) -> Examples:
    if len(parts) == 1:
      return parts[0]
    shift = np.cumsum([0] + [p.tokens.size for p in parts[:-1]])
    return Examples(np.concatenate([p.tokens for p in parts]),
                    np.concatenate([p.lens for p in parts]),
                    np.concatenate([p.labels for p in parts]),
                    np.concatenate([p.starts + s for p, s in zip(parts, shift)]),
                    cut=np.concatenate([p.cut for p in parts]))

  def __len__(self) -> int:
    return len(self.lens)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return self.take(np.arange(len(self))[i])
    if not isinstance(i, (int, np.integer)):
      return self.take(i)
    if not -len(self) <= i < len(self):
      raise IndexError(f"example {i} of {len(self)}")
    i = int(i) % len(self)
    (lp, lc, lr), at = self.lens[i].tolist(), int(self.starts[i])
    ids = self.tokens[at:at + lp + lc + max(lr, 0)].tolist()
    return Tokenized(ids[:lp], ids[lp:lp + lc], None if lr < 0 else ids[lp + lc:],
                     float(self.labels[i]), int(self.cut[i]))

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def take(self, idx) -> Examples:
    """The examples at the given indices, in that order, on the same token array."""
    idx = np.asarray(idx, np.int64).reshape(-1)
    return Examples(self.tokens, self.lens[idx], self.labels[idx], self.starts[idx],
                    narrow=False, cut=self.cut[idx])

  @property
  def contiguous(self) -> bool:
    """Whether the ids are the examples' own, one after another from the first token."""
    sizes = self.sizes
    return sizes.sum() == self.tokens.size and np.array_equal(self.starts, np.cumsum(sizes) - sizes)

  def compact(self) -> Examples:
    """The same examples with their ids copied, in order, into an array of their own (itself
    when it is so already)."""
    if self.contiguous:
      return self
    sizes = self.sizes
    to = np.cumsum(sizes) - sizes
    out = np.empty(int(sizes.sum()), self.tokens.dtype)
    for a in range(0, len(self), self.COMPACT_BLOCK):   # bounds the int64 positions array
      b = slice(a, a + self.COMPACT_BLOCK)
      n = int(sizes[b].sum())
      at = np.repeat(self.starts[b] - to[b], sizes[b]) + np.arange(to[a], to[a] + n)
      out[to[a]:to[a] + n] = self.tokens[at]
    return Examples(out, self.lens, self.labels, narrow=False, cut=self.cut)

  @property
  def longest(self) -> int:
    """The longest sequence: prompt + the longer completion (0 with no examples)."""
    return int((self.lens[:, 0] + self.lens[:, 1:].max(1)).max(initial=0))

  @property
  def nbytes(self) -> int:
    """Bytes of the arrays it holds (the whole token array, also when it is shared)."""
    return (self.tokens.nbytes + self.lens.nbytes + self.labels.nbytes + self.starts.nbytes
            + self.sizes.nbytes + self.cut.nbytes)

  def __eq__(self, other):
    if isinstance(other, Examples):
      return (np.array_equal(self.lens, other.lens) and np.array_equal(self.labels, other.labels)
              and np.array_equal(self.cut, other.cut)
              and np.array_equal(self.compact().tokens, other.compact().tokens))
    if isinstance(other, collections.abc.Sequence) and not isinstance(other, (str, bytes)):
      return len(self) == len(other) and all(a == b for a, b in zip(self, other))
    return NotImplemented

  __hash__ = None

  def __repr__(self):
    return f"Examples({len(self)} examples on {self.tokens.size} tokens as {self.tokens.dtype})"


class _Builder:
  """Appends Tokenized examples (add) or Examples (extend) to growing arrays: the ids as uint16
  until one does not fit, then as int32, so the built Examples takes the ids' buffer as it is
  (2 bytes a token for most vocabularies, with no second copy)."""

  def __init__(self):
    self.tokens, self.lens, self.labels = array.array("H"), array.array("i"), array.array("d")
    self.cut = array.array("B")

  def _widen(self):
    self.tokens = array.array("i", self.tokens)

  def add(self, e: Tokenized):
    self.lens.extend((len(e.prompt), len(e.chosen),
                      -1 if e.rejected is None else len(e.rejected)))
    for ids in (e.prompt, e.chosen, e.rejected or ()):
      n = len(self.tokens)
      try:
        self.tokens.extend(ids)
      except OverflowError:   # an id past 65535: int32 from here on
        del self.tokens[n:]
        if self.tokens.typecode == "i":
          raise
        self._widen()
        self.tokens.extend(ids)
    self.labels.append(e.label)
    self.cut.append(e.cut)

  def extend(self, examples: Examples):
    examples = examples.compact()
    if examples.tokens.dtype == np.int32 and self.tokens.typecode == "H":
      self._widen()
    for out, a in ((self.tokens, examples.tokens), (self.lens, examples.lens),
                   (self.labels, examples.labels), (self.cut, examples.cut)):
      a = np.ascontiguousarray(a, out.typecode).reshape(-1)   # no copy when it is so already
      if a.size:
        out.frombytes(memoryview(a).cast("B"))

  def build(self) -> Examples:
    wide = self.tokens.typecode == "i"
    return Examples(np.frombuffer(self.tokens, np.int32 if wide else np.uint16),
                    np.frombuffer(self.lens, np.int32), np.frombuffer(self.labels, np.float64),
                    narrow=wide, cut=np.frombuffer(self.cut, np.uint8))

  def close(self):
    """Nothing to release (tokenize_rows closes either store)."""


class _Sink:
  """_Builder's extend/build with the ids in a file of `directory` instead of memory: the file
  is deleted as soon as it is opened (a crash leaves nothing behind) and mapped read-only when
  done. Lengths, labels and cut flags stay in memory. The ids are uint16 until a round brings
  int32 ones: then those stored are rewritten as int32 once."""
  CHUNK = 1 << 24   # bytes read at a time when widening the file

  def __init__(self, directory: str):
    self.directory, self.dtype, self.size = directory, np.dtype(np.uint16), 0
    self.lens, self.labels, self.cut = [], [], []
    self.out = self._open()

  def _open(self):
    os.makedirs(self.directory, exist_ok=True)
    return tempfile.TemporaryFile(dir=self.directory)   # unlinked at once

  def _write(self, ids: np.ndarray):
    self.out.write(memoryview(np.ascontiguousarray(ids, self.dtype)).cast("B"))

  def extend(self, examples: Examples):
    examples = examples.compact()
    if examples.tokens.dtype == np.int32 and self.dtype == np.uint16:
      self._widen()
    self._write(examples.tokens)
    self.size += examples.tokens.size
    self.lens.append(examples.lens)
    self.labels.append(examples.labels)
    self.cut.append(examples.cut)

  def _widen(self):
    self.dtype = np.dtype(np.int32)
    old, self.out = self.out, self._open()
    old.seek(0)
    while chunk := old.read(self.CHUNK):
      self._write(np.frombuffer(chunk, np.uint16))
    old.close()

  def build(self) -> Examples:
    lens = np.concatenate(self.lens) if self.lens else np.zeros((0, 3), np.int32)
    labels = np.concatenate(self.labels) if self.labels else np.zeros(0)
    cut = np.concatenate(self.cut) if self.cut else np.zeros(0, np.uint8)
    self.out.flush()
    tokens = (np.memmap(self.out, self.dtype, "r", shape=(self.size,)) if self.size
              else np.zeros(0, self.dtype))
    return Examples(tokens, lens, labels, narrow=False, cut=cut)

  def close(self):
    """Closes the file (a mapping of it stays, and its space is freed with the mapping)."""
    self.out.close()


def largest_id(tokens: np.ndarray, pad_id: int) -> int:
  """The largest id a model reads from these token ids (an Examples' flat array) and their pad
  id: it must index the model's embedding."""
  return max(int(tokens.max()) if tokens.size else 0, pad_id)


def _narrow(tokens: np.ndarray) -> np.ndarray:
  """Token ids as uint16 when every id fits (most vocabularies), else int32."""
  if tokens.dtype == np.uint16:
    return tokens
  if tokens.size == 0:
    return tokens.astype(np.uint16)
  low, high = tokens.min(), tokens.max()
  if tokens.dtype.kind not in "iu" or low < np.iinfo(np.int32).min or high > np.iinfo(np.int32).max:
    raise ValueError(f"token ids must be integers that fit int32, got {tokens.dtype} from "
                     f"{low} to {high}")
  return tokens.astype(np.uint16 if 0 <= low and high < 1 << 16 else np.int32, copy=False)


# ---------------------------------------------------------------------------------------------
# Batching: [chosen; rejected] rows, padded to a few length buckets.
# ---------------------------------------------------------------------------------------------


SCORE_PARTS = 4   # config.data.score_parts: K is a multiple of L/4 (at most 4 shapes per L)


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
  """The smallest bucket that holds n tokens."""
  for b in sorted(buckets):
    if n <= b:
      return b
  raise ValueError(f"sequence of {n} tokens exceeds the largest bucket {max(buckets)}")


def collate(examples: Sequence[Tokenized], buckets: Sequence[int], pad_id: int,
            valid: Optional[Sequence[bool]] = None,
            score_parts: int = SCORE_PARTS) -> dict[str, np.ndarray]:
  """Stacks B examples into 2B rows: [chosen_0..chosen_{B-1}; rejected_0..rejected_{B-1}].

  Unpaired examples (rejected is None) use the second half for the mismatched completion
  (x_i, y_{i+1 mod B}) on which KTO estimates its KL reference point; that completion is cut
  at the end to fit the largest bucket (it was truncated against another prompt).
  Keys (R = 2B rows, L = bucket length):
    tokens, positions, segment_ids (0 = padding), loss_mask (1 on completion tokens),
    seq_index (which of the 2B sequences a token belongs to) : [R, L]
    valid, label : [B]
    score_index (see add_score_index; absent when every position may be scored) : [R, K]
  """
  b = len(examples)
  if b == 0:
    raise ValueError("collate needs at least one example")
  seqs = [(list(e.prompt), list(e.chosen)) for e in examples]
  if all(e.rejected is not None for e in examples):
    seqs += [(list(e.prompt), list(e.rejected)) for e in examples]
  else:
    top = max(buckets)
    seqs += [(list(e.prompt), list(examples[(i + 1) % b].chosen)[:max(top - len(e.prompt), 1)])
             for i, e in enumerate(examples)]
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
  if valid is not None and len(valid) != b:
    raise ValueError(f"valid has {len(valid)} entries for {b} examples")
  return add_score_index({
      "tokens": tokens, "positions": positions, "segment_ids": segment_ids,
      "loss_mask": loss_mask,
      "seq_index": np.broadcast_to(np.arange(r, dtype=np.int32)[:, None], (r, length)).copy(),
      "valid": np.asarray(valid if valid is not None else [True] * b, np.float32),
      "label": np.asarray([e.label for e in examples], np.float32),
  }, score_parts)


def add_score_index(batch: dict, parts: int = SCORE_PARTS) -> dict:
  """Adds batch["score_index"] [..., K]: per row, the positions of its scored tokens (loss_mask
  1) in order, then L (past the row: nothing). The log-prob loop computes the unembedding, the
  [D, V] matmul, only there (models/logprobs.scoring_view), not on prompt and padding positions.

  K is the smallest multiple of ceil(L / parts) that holds the row with the most scored tokens,
  so a row length compiles to at most `parts` shapes. When K would be L, or parts is 0, nothing
  is added and every position is scored. Every host builds the same global batch, so K agrees.
  """
  if parts < 1:
    return batch
  mask = np.asarray(batch["loss_mask"]) > 0
  length = mask.shape[-1]
  quantum = -(-length // parts)
  k = max(1, -(-int(mask.sum(-1).max(initial=0)) // quantum)) * quantum
  if k >= length:
    return batch
  flat = mask.reshape(-1, length)
  rows, cols = np.nonzero(flat)
  index = np.full((flat.shape[0], k), length, np.int32)
  index[rows, np.cumsum(flat, axis=1)[rows, cols] - 1] = cols
  batch["score_index"] = index.reshape(*mask.shape[:-1], k)
  return batch


class Batches:
  """Batch `step` of an endless shuffled stream; a pure function of (seed, step), so a resumed
  run sees exactly the batches an uninterrupted one would. Epoch e is the permutation drawn
  from (seed, e); batch `step` takes positions [step*B, (step+1)*B) of the concatenated epochs,
  so every example appears once per epoch and a batch may straddle two epochs."""

  def __init__(self, examples: Sequence[Tokenized], batch_size: int, seed: int,
               buckets: Sequence[int], pad_id: int, shuffle: bool = True,
               columns: Optional[dict[str, np.ndarray]] = None,
               score_parts: int = SCORE_PARTS):
    if batch_size < 1:
      raise ValueError(f"config.batch_size={batch_size} must be >= 1")
    if batch_size > len(examples):
      raise ValueError(f"config.batch_size={batch_size} exceeds the {len(examples)} examples")
    examples = Examples.of(examples)
    if examples.longest > max(buckets):
      raise ValueError(f"an example of {examples.longest} tokens does not fit the largest bucket "
                       f"{max(buckets)} of config.data.buckets={tuple(buckets)}")
    self.examples, self.batch_size = examples, batch_size
    self.seed, self.buckets, self.pad_id, self.shuffle = seed, tuple(buckets), pad_id, shuffle
    self._perms: dict[int, np.ndarray] = {}
    self.columns = dict(columns or {})   # per-example [N, 2] values, e.g. cached ref log-probs
    self.score_parts = score_parts

  def __len__(self):
    return len(self.examples)

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      n = len(self.examples)
      # A batch spans at most two epochs: keep the newest two permutations.
      self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
      seed = int(self.seed) & 0xFFFFFFFFFFFFFFFF   # default_rng rejects negative seeds
      self._perms[epoch] = (np.random.default_rng([seed, epoch]).permutation(n)
                            if self.shuffle else np.arange(n))
    return self._perms[epoch]

  def indices(self, step: int) -> list[int]:
    n = len(self.examples)
    pos = step * self.batch_size + np.arange(self.batch_size)
    return [int(self._perm(int(p // n))[p % n]) for p in pos]

  def epoch(self, step: int) -> float:
    return step * self.batch_size / len(self.examples)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    idx = self.indices(step)
    batch = collate([self.examples[i] for i in idx], self.buckets, self.pad_id,
                    score_parts=self.score_parts)
    return add_columns(batch, self.columns, idx)


def add_columns(batch: dict, columns: dict[str, np.ndarray], idx) -> dict:
  """Per-example [N, 2] (chosen, rejected) columns -> [2B] arrays in the batch's row order."""
  for name, col in columns.items():
    col = np.asarray(col)[np.asarray(idx)]
    batch[name] = np.concatenate([col[:, 0], col[:, 1]])
  return batch


def eval_batches(examples: Sequence[Tokenized], batch_size: int, buckets: Sequence[int],
                 pad_id: int, columns: Optional[dict[str, np.ndarray]] = None,
                 score_parts: int = SCORE_PARTS) -> Iterable[dict[str, np.ndarray]]:
  """Every example once, in order; the last batch is filled with invalid copies."""
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  for start in range(0, len(examples), batch_size):
    idx = list(range(start, min(start + batch_size, len(examples))))
    valid = [True] * len(idx) + [False] * (batch_size - len(idx))
    idx += [idx[0]] * (batch_size - len(idx))
    batch = collate([examples[i] for i in idx], buckets, pad_id, valid, score_parts)
    yield add_columns(batch, columns or {}, idx)
