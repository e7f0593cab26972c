"""Packing: several sequences per fixed-length row, told apart by segment ids.

`preference.collate` gives each of the 2B sequences of a batch ([chosen; rejected], or for
unpaired data [completion; mismatched completion]) its own row, padded to the batch's length
bucket; one long sequence pads every row to it. `pack` instead places whole sequences into rows
of `row_length` tokens by first-fit-decreasing bin packing (a sequence is never split). The batch
has the same keys and meaning as collate's:

  tokens, positions, segment_ids, loss_mask, seq_index : [R, row_length]
  valid, label                                           : [B]

Sequence s (chosen_i = i, rejected/mismatched_i = B + i, built exactly as collate builds them)
gets segment id 1, 2, 3, ... within its row, positions restarting at 0, and seq_index = s on its
tokens. Padding has segment 0, loss_mask 0, pad_id and seq_index 0 (masked out of every sum). The
model's attention mask (models/layers.attention_mask: same segment, causal by position) keeps
segments apart and the log-prob reduction (models/logprobs: segment_sum over seq_index, per-token
fields left-aligned per sequence) serves both layouts, so the step needs no change: losses and
gradients with packing equal those without (tests/test_packing.py, to f32 reduction order).
Every packed sequence must have a non-empty prompt (tokenize_rows guarantees it): the first token
of a segment is then never scored, so nothing is read across a segment boundary.

The row count R is rounded up to one of `row_buckets` so that the step compiles a bounded number
of times. Default (`default_row_buckets`): four per octave, n = m·2^e with m in {4, 5, 6, 7}
(and 1, 2, 3), i.e. 1..8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ... (at most 25% empty rows), each
rounded up to a multiple of `row_multiple` (the data×fsdp device count, so rows shard evenly),
and capped at 2B rounded up (enough for any batch: one sequence per row). At a fixed batch size the
needed row count varies little, so a run hits a few buckets (2-3 on the distribution below).
Powers of two (`row_buckets=power_of_two_row_buckets(...)`) compile less often but round up to
50% empty rows.

Gradient accumulation: `pack_microbatches(examples, k, ...)` splits the B pairs into k groups of
b = B/k in order (micro-batch j holds pairs j*b .. (j+1)*b-1, exactly like train.microbatches),
packs each group, pads all to the same R and stacks them: [k, R, row_length] and [k, b];
seq_index is relative to the micro-batch (0 .. 2b-1). The mismatched completions of unpaired
data are formed over the whole batch first (as collate does), then split.

Padding removed on a realistic length distribution (prompts lognormal median 150 tokens σ 0.9,
completions lognormal median 250 σ 0.8, each chosen/rejected drawn independently; prompts cut to
max_prompt_length 512, completions to max_length 1024; batch 64 pairs; length buckets
preference.default_buckets(1024) = 32, 64, ..., 1024; 400 batches, seed 0):

  layout                                tokens/batch  × tokens  padding  removed  buckets hit
  bucketed rows (collate)                     131072      1.00    0.502        -            -
  packed 1024, default row buckets             75428      0.58    0.134    0.846            3
  packed 1024, power-of-two row buckets       105349      0.80    0.380    0.391            2
  packed 1024, rows not bucketed               67057      0.51    0.026    0.974            -
  packed 2048, default row buckets             74056      0.56    0.118    0.867            3
  packed 2048, power-of-two row buckets        99942      0.76    0.346    0.473            2
  packed 2048, rows not bucketed               66836      0.51    0.023    0.977            -

removed = 1 − padding tokens packed / padding tokens bucketed (the longest of 128
sequences nearly always lands in the 1024 bucket, so the bucketed layout is half padding). Most
of what packing leaves is empty rows from rounding R up to a row bucket. Attention is computed
densely over each row (the mask only zeroes it), so its FLOPs grow with row_length: 2048-token
rows remove a little more padding than 1024 but spend more on attention. Reproduce with

    python -m dpo_jax.data.packing            # [--batches N] [--batch-size B] [--seed S]
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

import numpy as np

from dpo_jax.data import preference
from dpo_jax.data.preference import Tokenized
from dpo_jax.models.layers import BRANCH


# ---------------------------------------------------------------------------------------------
# Row buckets and bin packing
# ---------------------------------------------------------------------------------------------


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def default_row_buckets(max_rows: int, multiple: int = 1) -> tuple[int, ...]:
  """Row counts the step may compile for: four per octave (1..8, 10, 12, 14, 16, 20, ...),
  rounded up to multiples of `multiple`, up to max_rows rounded up."""
  if max_rows < 1 or multiple < 1:
    raise ValueError(f"max_rows={max_rows} and multiple={multiple} must be >= 1")
  top = _round_up(max_rows, multiple)
  out, e = {1, 2, 3}, 0
  while 4 << e < top:
    out.update(m << e for m in (4, 5, 6, 7))
    e += 1
  return tuple(sorted({_round_up(n, multiple) for n in out if n < top} | {top}))


def power_of_two_row_buckets(max_rows: int, multiple: int = 1) -> tuple[int, ...]:
  """multiple·2^e up to max_rows rounded up to a multiple of `multiple`."""
  top = _round_up(max_rows, multiple)
  out, n = [], multiple
  while n < top:
    out.append(n)
    n *= 2
  return tuple(out) + (top,)


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """Bins (lists of item indices, ascending) holding every item, none over `capacity`.

  Items are placed longest first (ties: lower index first) into the first bin with room.
  """
  lengths = np.asarray(lengths, np.int64)
  room = np.zeros(len(lengths), np.int64)   # at most one bin per item
  bins: list[list[int]] = []
  for s in sorted(range(len(lengths)), key=lambda s: (-lengths[s], s)):
    fits = np.flatnonzero(room[:len(bins)] >= lengths[s])
    if fits.size:
      r = int(fits[0])
    else:
      r = len(bins)
      bins.append([])
      room[r] = capacity
    bins[r].append(s)
    room[r] -= lengths[s]
  return [sorted(b) for b in bins]


def row_bucket(n_rows: int, row_buckets: Sequence[int]) -> int:
  for r in sorted(row_buckets):
    if n_rows <= r:
      return r
  raise ValueError(f"packing needs {n_rows} rows, more than the largest row bucket "
                   f"{max(row_buckets)} of row_buckets={tuple(row_buckets)}")


# ---------------------------------------------------------------------------------------------
# Packed batches
# ---------------------------------------------------------------------------------------------


def sequences(examples: Sequence[Tokenized], max_length: int) -> list[tuple[list, list]]:
  """The 2B (prompt, completion) sequences of a batch, exactly as preference.collate makes
  them: [chosen; rejected], or for unpaired examples [completion_i; completion_{i+1 mod B}
  under prompt_i], the mismatched completion cut to fit max_length (collate: max(buckets))."""
  b = len(examples)
  if b == 0:
    raise ValueError("packing needs at least one example")
  seqs = [(list(e.prompt), list(e.chosen)) for e in examples]
  if all(e.rejected is not None for e in examples):
    seqs += [(list(e.prompt), list(e.rejected)) for e in examples]
  else:
    seqs += [(list(e.prompt),
              list(examples[(i + 1) % b].chosen)[:max(max_length - len(e.prompt), 1)])
             for i, e in enumerate(examples)]
  return seqs


def _name(s: int, b: int, paired: bool) -> str:
  half = "chosen" if s < b else ("rejected" if paired else "mismatched completion")
  return f"sequence {s} (example {s % b} of the batch, {half})"


def _check(seqs, row_length: int, b: int, paired: bool):
  for s, (p, c) in enumerate(seqs):
    if len(p) + len(c) > row_length:
      raise ValueError(f"{_name(s, b, paired)} has {len(p) + len(c)} tokens, more than "
                       f"row_length={row_length}; packing never splits a sequence")
    if not p:
      raise ValueError(f"{_name(s, b, paired)} has an empty prompt; packing needs at least one "
                       f"prompt token so that no completion token is predicted from the "
                       f"previous segment")


def _check_shared(seqs, row_length: int, b: int, paired: bool):
  for i in range(b):
    p, c1, c2 = seqs[i][0], seqs[i][1], seqs[b + i][1]
    if len(p) + len(c1) + len(c2) > row_length:
      second = "rejected" if paired else "mismatched completion"
      raise ValueError(f"example {i} of the batch has {len(p) + len(c1) + len(c2)} tokens with "
                       f"its prompt shared ({len(p)} prompt + {len(c1)} chosen + {len(c2)} "
                       f"{second}), more than row_length={row_length}; packing never splits a "
                       f"pair (raise config.data.row_length)")


def pack_microbatches(examples: Sequence[Tokenized], k: int, *, row_length: int,
                      row_buckets: Optional[Sequence[int]] = None, pad_id: int,
                      valid: Optional[Sequence[bool]] = None, max_length: Optional[int] = None,
                      row_multiple: int = 1,
                      columns: Optional[dict[str, np.ndarray]] = None,
                      share_prompt: bool = False,
                      score_parts: int = preference.SCORE_PARTS) -> dict[str, np.ndarray]:
  """B examples -> k packed micro-batches: [k, R, row_length] rows, [k, B/k] per example.

  Micro-batch j holds pairs j*b .. (j+1)*b-1 (b = B/k), its sequences numbered 0 .. 2b-1
  (chosen_i = i, second half b + i); all micro-batches are padded to the same R, a row bucket
  (default: default_row_buckets(2b, row_multiple), or (b, row_multiple) with share_prompt).
  `columns` are batch-level per-sequence arrays [2B] in collate's order (preference.add_columns)
  and come back as [k, 2b] like train.microbatches makes them. max_length (default row_length)
  cuts mismatched completions of unpaired data, as collate cuts them to its largest bucket.
  share_prompt: each pair is one unit [prompt | chosen | rejected] (see the module docstring).
  score_parts: preference.add_score_index (one K for all micro-batches).
  """
  big_b = len(examples)
  if k < 1 or big_b % k:
    raise ValueError(f"batch of {big_b} examples is not divisible into {k} micro-batches")
  if valid is not None and len(valid) != big_b:
    raise ValueError(f"valid has {len(valid)} entries for {big_b} examples")
  b = big_b // k
  seqs = sequences(examples, row_length if max_length is None else max_length)
  paired = all(e.rejected is not None for e in examples)
  _check(seqs, row_length, big_b, paired)
  if share_prompt:
    _check_shared(seqs, row_length, big_b, paired)
  groups = []
  for j in range(k):
    members = list(range(j * b, (j + 1) * b)) + list(range(big_b + j * b, big_b + (j + 1) * b))
    group = [seqs[s] for s in members]
    if share_prompt:   # unit i: (prompt, chosen completion, second completion)
      units = [(group[i][0], group[i][1], group[b + i][1]) for i in range(b)]
    else:
      units = group
    groups.append((units, first_fit_decreasing([sum(map(len, u)) for u in units],
                                               row_length)))
  if row_buckets is None:
    row_buckets = default_row_buckets(b if share_prompt else 2 * b, row_multiple)
  bad = [r for r in row_buckets if r % row_multiple]
  if bad:
    raise ValueError(f"row buckets {bad} are not multiples of row_multiple={row_multiple}")
  n_rows = row_bucket(max(len(rows) for _, rows in groups), row_buckets)

  shape = (k, n_rows, row_length)
  out = {"tokens": np.full(shape, pad_id, np.int32), "positions": np.zeros(shape, np.int32),
         "segment_ids": np.zeros(shape, np.int32), "loss_mask": np.zeros(shape, np.float32),
         "seq_index": np.zeros(shape, np.int32)}
  if share_prompt:   # the hidden state predicting each token: t-1, but see below
    out["source"] = np.broadcast_to(np.maximum(np.arange(row_length, dtype=np.int32) - 1, 0),
                                    shape).copy()
  for j, (units, rows) in enumerate(groups):
    for r, row in enumerate(rows):
      start = 0
      for seg, s in enumerate(row, 1):
        if share_prompt:
          p, c1, c2 = units[s]
          # (tokens, segment, first position, sequence, scored) of prompt, chosen, rejected
          parts = ((p, seg, 0, s, False), (c1, seg + BRANCH, len(p), s, True),
                   (c2, seg + 2 * BRANCH, len(p), b + s, True))
        else:
          p, c = units[s]
          parts = ((p, seg, 0, s, False), (c, seg, len(p), s, True))
        for toks, seg_id, pos0, seq, scored in parts:
          n = len(toks)
          sl = slice(start, start + n)
          out["tokens"][j, r, sl] = toks
          out["positions"][j, r, sl] = pos0 + np.arange(n)
          out["segment_ids"][j, r, sl] = seg_id
          out["seq_index"][j, r, sl] = seq
          if scored:
            out["loss_mask"][j, r, sl] = 1.0
          start += n
        if share_prompt:   # the first rejected token is predicted by the last prompt token
          out["source"][j, r, start - len(c2)] = start - len(c2) - len(c1) - 1
  out["valid"] = np.asarray(valid if valid is not None else [True] * big_b,
                            np.float32).reshape(k, b)
  out["label"] = np.asarray([e.label for e in examples], np.float32).reshape(k, b)
  for name, x in (columns or {}).items():
    x = np.asarray(x)
    if x.shape[0] != 2 * big_b:
      raise ValueError(f"column {name!r} has {x.shape[0]} entries, expected {2 * big_b}")
    out[name] = split_sequences(x, k)
  return preference.add_score_index(out, score_parts)


def split_sequences(x: np.ndarray, k: int) -> np.ndarray:
  """[2B, ...] per-sequence values [chosen; rejected] -> [k, 2B/k, ...] (train.microbatches)."""
  b = x.shape[0] // 2
  return (x.reshape(2, k, b // k, *x.shape[1:]).swapaxes(0, 1)
          .reshape(k, 2 * (b // k), *x.shape[1:]))


def pack(examples: Sequence[Tokenized], *, row_length: int,
         row_buckets: Optional[Sequence[int]] = None, pad_id: int,
         valid: Optional[Sequence[bool]] = None, max_length: Optional[int] = None,
         row_multiple: int = 1, share_prompt: bool = False,
         score_parts: int = preference.SCORE_PARTS) -> dict[str, np.ndarray]:
  """B examples -> one packed batch with collate's keys: [R, row_length] rows, [B] examples.

  R is the smallest of `row_buckets` (default default_row_buckets(2B, row_multiple)) that
  holds the first-fit-decreasing packing. Raises ValueError naming a sequence longer than
  row_length. See the module docstring for the layout.
  """
  out = pack_microbatches(examples, 1, row_length=row_length, row_buckets=row_buckets,
                          pad_id=pad_id, valid=valid, max_length=max_length,
                          row_multiple=row_multiple, share_prompt=share_prompt,
                          score_parts=score_parts)
  return {name: x[0] for name, x in out.items()}


class PackedBatches(preference.Batches):
  """preference.Batches with packed rows: the same pure (seed, step) -> examples stream
  (`indices`, `epoch`, `columns`, `buckets` for unpacked eval/reference passes), but
  `self(step)` packs the batch into rows of row_length tokens and
  `self.microbatches(step, k)` gives the [k, ...] micro-batched form the train step takes
  (use it instead of train.microbatches(self(step), k)). Mismatched completions of unpaired
  data are cut to max(buckets), as Batches cuts them, so the two give the same sequences."""

  def __init__(self, examples: Sequence[Tokenized], batch_size: int, seed: int,
               buckets: Sequence[int], pad_id: int, shuffle: bool = True,
               columns: Optional[dict[str, np.ndarray]] = None, *, row_length: int,
               row_buckets: Optional[Sequence[int]] = None, row_multiple: int = 1,
               share_prompt: bool = False, score_parts: int = preference.SCORE_PARTS):
    super().__init__(examples, batch_size, seed, buckets, pad_id, shuffle, columns,
                     score_parts)
    if row_length < max(self.buckets):
      raise ValueError(f"config.data.row_length={row_length} is shorter than the largest "
                       f"length bucket {max(self.buckets)}; a sequence may not fit a row")
    self.row_length = row_length
    self.row_buckets = None if row_buckets is None else tuple(row_buckets)
    self.row_multiple = row_multiple
    self.share_prompt = share_prompt
    if share_prompt:   # fail now, naming the example, rather than at the step that draws it
      prompt, chosen, rejected = self.examples.lens.T.astype(np.int64)
      second = np.where(rejected >= 0, rejected, np.minimum(
          chosen.max(initial=0), np.maximum(max(self.buckets) - prompt, 1)))
      over = np.flatnonzero(prompt + chosen + second > row_length)
      if over.size:
        i = over[0]
        raise ValueError(
            f"example {i} has {prompt[i] + chosen[i] + second[i]} tokens with its prompt shared "
            f"({prompt[i]} prompt + {chosen[i]} + {second[i]} completion), more than "
            f"config.data.row_length={row_length}; raise it (0 = twice max_length always fits) "
            f"or set config.data.share_prompt=False")

  def units(self, k: int) -> int:
    """Sequences (pairs with share_prompt) of one of k micro-batches: the rows it needs when
    none share a row."""
    return self.batch_size // k * (1 if self.share_prompt else 2)

  def check_row_buckets(self, k: int):
    """Fails now, naming config.data.row_buckets, where a step of k micro-batches could fail
    later (after checkpoints, and again on resume, since batches are a function of the step): a
    bucket that does not shard over row_multiple devices, or a largest bucket below the rows the
    worst micro-batch needs, one row per sequence (per pair with share_prompt)."""
    if self.row_buckets is None:
      return
    key = f"config.data.row_buckets={self.row_buckets}"
    bad = [r for r in self.row_buckets if r % self.row_multiple]
    if bad:
      raise ValueError(f"{key}: {bad} are not multiples of the {self.row_multiple} data×fsdp "
                       f"devices the rows are sharded over")
    units = self.units(k)
    if max(self.row_buckets) < units:
      need = -(-units // self.row_multiple) * self.row_multiple
      raise ValueError(f"{key}: a micro-batch of {self.batch_size // k} pairs needs up to "
                       f"{units} rows (one per {'pair' if self.share_prompt else 'sequence'} "
                       f"when none share a row); add a bucket of at least {need}")

  def microbatches(self, step: int, k: int = 1) -> dict[str, np.ndarray]:
    idx = self.indices(step)
    if self.batch_size % k:
      raise ValueError(f"config.batch_size={self.batch_size} is not divisible by "
                       f"config.grad_accum={k}")
    row_buckets = self.row_buckets
    if row_buckets is None:   # the same buckets whatever k: every step compiles a known set
      row_buckets = default_row_buckets(self.units(k), self.row_multiple)
    cols = preference.add_columns({}, self.columns, idx)
    return pack_microbatches([self.examples[i] for i in idx], k, row_length=self.row_length,
                             row_buckets=row_buckets, pad_id=self.pad_id,
                             max_length=max(self.buckets), row_multiple=self.row_multiple,
                             columns=cols, share_prompt=self.share_prompt,
                             score_parts=self.score_parts)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    return {name: x[0] for name, x in self.microbatches(step, 1).items()}


# ---------------------------------------------------------------------------------------------
# Padding accounting
# ---------------------------------------------------------------------------------------------


def padding_fraction(batch: dict) -> float:
  """Fraction of the batch's token slots that are padding (segment id 0), either layout."""
  seg = np.asarray(batch["segment_ids"])
  return float(np.mean(seg == 0))


def padding_report(lengths: np.ndarray, batch_size: int, buckets: Sequence[int],
                   row_length: int, row_buckets: Optional[Sequence[int]] = None,
                   row_multiple: int = 1) -> dict:
  """Token slots and padding of the bucketed unpacked layout vs the packed layout.

  lengths: [N, 2] total tokens (prompt + completion) of each example's (chosen, rejected),
  taken batch_size at a time in order (a trailing partial batch is dropped). Bucketed layout:
  2B rows of bucket_length(longest sequence of the batch). Packed: first-fit-decreasing rows of
  row_length, the row count rounded up to row_buckets (default default_row_buckets(2B)).
  Returns totals over all batches: real, unpacked/packed (slots), unpacked_pad/packed_pad,
  their padding fractions, removed = 1 − packed_pad / unpacked_pad, the packed rows without
  bucketing (packed_exact), and the row buckets hit.
  """
  lengths = np.asarray(lengths, np.int64)
  if row_buckets is None:
    row_buckets = default_row_buckets(2 * batch_size, row_multiple)
  n_batches = len(lengths) // batch_size
  real = unpacked = packed = packed_exact = 0
  hit = set()
  for i in range(n_batches):
    seq = lengths[i * batch_size:(i + 1) * batch_size].T.reshape(-1)   # [chosen; rejected]
    if seq.max() > row_length:
      raise ValueError(f"a sequence of {seq.max()} tokens exceeds row_length={row_length}")
    real += int(seq.sum())
    unpacked += len(seq) * preference.bucket_length(int(seq.max()), buckets)
    rows = len(first_fit_decreasing(seq, row_length))
    r = row_bucket(rows, row_buckets)
    hit.add(r)
    packed += r * row_length
    packed_exact += rows * row_length
  if not n_batches:
    raise ValueError(f"{len(lengths)} examples make no batch of {batch_size}")
  out = {"batches": n_batches, "real": real, "unpacked": unpacked, "packed": packed,
         "packed_exact": packed_exact, "unpacked_pad": unpacked - real,
         "packed_pad": packed - real, "packed_exact_pad": packed_exact - real,
         "row_buckets_hit": tuple(sorted(hit))}
  out["unpacked_pad_fraction"] = out["unpacked_pad"] / unpacked
  out["packed_pad_fraction"] = out["packed_pad"] / packed
  out["removed"] = 1.0 - out["packed_pad"] / max(out["unpacked_pad"], 1)
  out["removed_exact"] = 1.0 - out["packed_exact_pad"] / max(out["unpacked_pad"], 1)
  return out


def shared_report(lengths: np.ndarray, prompt: np.ndarray, batch_size: int, row_length: int,
                  row_buckets: Optional[Sequence[int]] = None, row_multiple: int = 1) -> dict:
  """Token slots of packed rows with the prompt shared ([prompt | chosen | rejected] units of
  P + C + R tokens) over the same batches as padding_report; `real` counts the tokens computed
  (each prompt once), `sequence_tokens` the 2 × (P + C) tokens of the unshared layout."""
  lengths, prompt = np.asarray(lengths, np.int64), np.asarray(prompt, np.int64)
  if row_buckets is None:
    row_buckets = default_row_buckets(batch_size, row_multiple)
  n_batches = len(lengths) // batch_size
  real = seq_tokens = packed = 0
  hit = set()
  for i in range(n_batches):
    sl = slice(i * batch_size, (i + 1) * batch_size)
    units = lengths[sl].sum(1) - prompt[sl]                  # P + C + R
    if units.max() > row_length:
      raise ValueError(f"a pair of {units.max()} tokens exceeds row_length={row_length}")
    real += int(units.sum())
    seq_tokens += int(lengths[sl].sum())
    r = row_bucket(len(first_fit_decreasing(units, row_length)), row_buckets)
    hit.add(r)
    packed += r * row_length
  return {"batches": n_batches, "real": real, "sequence_tokens": seq_tokens, "packed": packed,
          "pad_fraction": 1.0 - real / packed, "row_buckets_hit": tuple(sorted(hit))}


def realistic_lengths(n: int, seed: int = 0, max_length: int = 1024,
                      max_prompt_length: int = 512, prompt_median: float = 150.0,
                      completion_median: float = 250.0, prompt_sigma: float = 0.9,
                      completion_sigma: float = 0.8, with_prompt: bool = False):
  """[n, 2] chosen/rejected sequence lengths of a chat preference set (UltraFeedback-like:
  lognormal prompts and completions), truncated like preference.truncate; with_prompt: also
  the [n] prompt lengths."""
  rng = np.random.default_rng(seed)
  prompt = np.maximum(1, np.round(rng.lognormal(np.log(prompt_median), prompt_sigma, n)))
  prompt = np.minimum(prompt, max_prompt_length)
  comp = np.maximum(1, np.round(rng.lognormal(np.log(completion_median), completion_sigma,
                                              (n, 2))))
  comp = np.minimum(comp, max_length - prompt[:, None])
  lengths = (prompt[:, None] + comp).astype(np.int64)
  return (lengths, prompt.astype(np.int64)) if with_prompt else lengths


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batches", type=int, default=400)
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--max-length", type=int, default=1024)
  ap.add_argument("--max-prompt-length", type=int, default=512)
  args = ap.parse_args(argv)
  b = args.batch_size
  lengths, prompt = realistic_lengths(args.batches * b, args.seed, args.max_length,
                                      args.max_prompt_length, with_prompt=True)
  buckets = preference.default_buckets(args.max_length)
  print(f"{args.batches} batches of {b} pairs; prompts lognormal median 150 σ 0.9, completions "
        f"median 250 σ 0.8; max_prompt_length {args.max_prompt_length}, max_length "
        f"{args.max_length}; length buckets {buckets}")
  print(f"{'layout':<38}{'tokens/batch':>12}{'× tokens':>10}{'padding':>9}{'removed':>9}"
        f"{'buckets hit':>13}")
  base = None
  for row_length in (args.max_length, 2 * args.max_length):
    for label, rb in (("default row buckets", None),
                      ("power-of-two row buckets", power_of_two_row_buckets(2 * b))):
      rep = padding_report(lengths, b, buckets, row_length, rb)
      n = rep["batches"]
      if base is None:
        base = rep
        print(f"{'bucketed rows (collate)':<38}{rep['unpacked'] / n:>12.0f}{1:>10.2f}"
              f"{rep['unpacked_pad_fraction']:>9.3f}{'-':>9}{'-':>13}")
      print(f"{f'packed {row_length}, {label}':<38}{rep['packed'] / n:>12.0f}"
            f"{rep['packed'] / rep['unpacked']:>10.2f}{rep['packed_pad_fraction']:>9.3f}"
            f"{rep['removed']:>9.3f}{len(rep['row_buckets_hit']):>13}")
    print(f"{f'packed {row_length}, rows not bucketed':<38}{rep['packed_exact'] / n:>12.0f}"
          f"{rep['packed_exact'] / rep['unpacked']:>10.2f}"
          f"{rep['packed_exact_pad'] / rep['packed_exact']:>9.3f}{rep['removed_exact']:>9.3f}"
          f"{'-':>13}")
  # The prompt computed once per pair: [prompt | chosen | rejected] rows (share_prompt).
  for row_length in (2 * args.max_length,):
    rep = shared_report(lengths, prompt, b, row_length)
    n = rep["batches"]
    print(f"{f'packed {row_length}, prompt shared':<38}{rep['packed'] / n:>12.0f}"
          f"{rep['packed'] / base['unpacked']:>10.2f}{rep['pad_fraction']:>9.3f}{'':>9}"
          f"{len(rep['row_buckets_hit']):>13}")
    print(f"prompt sharing computes {rep['real'] / rep['sequence_tokens']:.3f} of the sequences' "
          f"tokens ({rep['real'] / n:.0f} instead of {rep['sequence_tokens'] / n:.0f} per batch); "
          f"packed rows of {row_length}: {rep['packed'] / base['packed'] :.2f}× the token slots "
          f"of unshared rows of {args.max_length}")
  return base


if __name__ == "__main__":
  main()
