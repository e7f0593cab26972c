"""Metrics to W/metrics.jsonl (one JSON object per logged step) and TensorBoard events, and
atomic writes of the workdir's other files.

With several processes (multi-host) every process computes the same outputs (pairs, reference
caches, results) and writes its own copy: each writes a temporary file of its own and renames it
into place, so on a workdir the hosts share no reader ever sees a half-written file, and on
per-host disks each host has its copy. Metrics and checkpoint metadata come from process 0 only.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
import zipfile

import numpy as np


def _process() -> int:
  import jax   # noqa: PLC0415  (only when writing: importing this module stays light)
  return jax.process_index()


def write_atomic(path: str, write, mode: str = "w"):
  """write(f) to a temporary file of this process next to `path`, then renamed to `path`."""
  root, ext = os.path.splitext(path)
  tmp = f"{root}.tmp{_process()}{ext}"
  with open(tmp, mode) as f:
    write(f)
  os.replace(tmp, path)


def write_npz(path: str, arrays: dict):
  """A cache of arrays: the directory made, the file renamed into place (see write_atomic)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  write_atomic(path, lambda f: np.savez(f, **arrays), mode="wb")


def prune(directory: str, keep: int, suffix: str = ".npz"):
  """Deletes all but the `keep` most recently written or used files of `directory` whose names
  end in `suffix` (not the temporary files of write_atomic); keep=0 deletes nothing. A file
  another process deleted first, or one mapped by a reader, is no error (the mapping stays)."""
  if keep <= 0 or not os.path.isdir(directory):
    return
  names = [n for n in os.listdir(directory) if n.endswith(suffix) and ".tmp" not in n]
  stamps = []
  for n in names:
    try:
      stamps.append((os.stat(os.path.join(directory, n)).st_mtime_ns, n))
    except FileNotFoundError:
      pass
  for _, n in sorted(stamps, reverse=True)[keep:]:
    try:
      os.remove(os.path.join(directory, n))
    except FileNotFoundError:
      pass


def read_npz(path: str, mapped: tuple[str, ...] = ()) -> dict | None:
  """A cache written by write_npz, or None when there is none or it cannot be read (said on
  stderr: the caller computes it again and overwrites it).

  The arrays named in `mapped` are mapped read-only from the file instead of read into memory:
  processes on one host share their pages, and they need not fit in memory. A rename over the
  file leaves a mapping on the old contents.
  """
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: (_map_member(z.zip, k) if k in mapped else z[k]) for k in z.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    print(f"{path}: not a readable cache ({type(e).__name__}: {e}); computing it again",
          file=sys.stderr)
    return None


def _map_member(zf: zipfile.ZipFile, name: str) -> np.ndarray:
  """The array `name` of an npz (np.savez stores members uncompressed) as a read-only memmap of
  the file np.load opened (a file renamed over the path since is not the one mapped)."""
  info = zf.getinfo(f"{name}.npy")
  if info.compress_type != zipfile.ZIP_STORED:
    raise ValueError(f"{name} is compressed, so it cannot be mapped")
  f = zf.fp
  f.seek(info.header_offset)
  local = f.read(30)   # the local file header: the name and extra field lengths end it
  if len(local) != 30 or local[:4] != b"PK\x03\x04":
    raise ValueError(f"no local header for {name}")
  name_len, extra_len = struct.unpack("<HH", local[26:30])
  f.seek(info.header_offset + 30 + name_len + extra_len)
  version = np.lib.format.read_magic(f)
  if version not in ((1, 0), (2, 0)):
    raise ValueError(f"{name}: npy format {version} is not mapped")
  read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                 else np.lib.format.read_array_header_2_0)
  shape, fortran, dtype = read_header(f)
  offset = f.tell()
  if fortran or dtype.hasobject or len(shape) != 1:
    raise ValueError(f"{name} is not a flat array")
  if offset + dtype.itemsize * shape[0] > os.fstat(f.fileno()).st_size:
    raise ValueError(f"{name} runs past the end of the file")
  if shape[0] == 0:
    return np.zeros(0, dtype)
  return np.asarray(np.memmap(f, dtype, "r", offset, shape))   # the mapping outlives the file


def save_tokenizer(tokenizer, directory: str):
  """tokenizer.save_pretrained(directory), each file renamed into place (see write_atomic)."""
  tmp = f"{directory.rstrip(os.sep)}.tmp{_process()}"
  tokenizer.save_pretrained(tmp)
  os.makedirs(directory, exist_ok=True)
  for name in os.listdir(tmp):
    os.replace(os.path.join(tmp, name), os.path.join(directory, name))
  os.rmdir(tmp)


class MetricsWriter:
  def __init__(self, workdir: str, start_step: int, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    truncate_after(self.path, start_step)
    from tensorboardX import SummaryWriter   # noqa: PLC0415
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)

  def write(self, step: int, metrics: dict, timing: dict | None = None):
    """metrics go to metrics.jsonl and TensorBoard; timing (wall-clock, not reproducible)
    only to TensorBoard, so that a resumed run's metrics.jsonl equals an uninterrupted one's."""
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _py(v) for k, v in sorted(metrics.items())}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
      f.flush()
      os.fsync(f.fileno())
    for k, v in {**row, **(timing or {})}.items():
      if k != "step" and isinstance(v, float) and math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _py(v):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


def truncate_after(path: str, step: int):
  """Drops rows logged after `step`: a resumed run re-logs them exactly once."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    rows = [line for line in f if line.strip()]
  keep = []
  for line in rows:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:   # a line cut short by a kill mid-write: re-logged on resume
      continue
    if row.get("step", 0) <= step:
      keep.append(line if line.endswith("\n") else line + "\n")
  if len(keep) != len(rows):
    write_atomic(path, lambda f: f.writelines(keep))


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
