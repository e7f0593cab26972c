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
import socket
import struct
import sys
import time
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


NPZ_CHUNK = 1 << 20   # bytes of an array written at a time (np.savez copies up to 16 MiB)


def write_npz(path: str, arrays: dict):
  """A cache of arrays: the directory made, the file renamed into place (see write_atomic).

  The file is np.savez's (members stored, not compressed, so read_npz can map them), but each
  array is written NPZ_CHUNK bytes at a time from its own memory: an array mapped from a file
  is never copied whole."""
  arrays = {name: np.asarray(a) for name, a in arrays.items()}
  for name, a in arrays.items():
    if a.dtype.hasobject:
      raise ValueError(f"{path}: array {name!r} holds Python objects, which a cache cannot")
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

  def write(f):
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
      for name, a in arrays.items():
        a = a if a.flags.c_contiguous else a.copy()   # (ascontiguousarray makes 0-d 1-d)
        with z.open(f"{name}.npy", "w", force_zip64=True) as out:
          np.lib.format.write_array_header_1_0(out, np.lib.format.header_data_from_array_1_0(a))
          data = a.reshape(-1).view(np.uint8)
          for at in range(0, data.size, NPZ_CHUNK):
            out.write(data[at:at + NPZ_CHUNK])

  write_atomic(path, write, mode="wb")


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
    self._tb = EventFile(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)

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
    self._tb.scalars(step, {k: v for k, v in {**row, **(timing or {})}.items()
                            if k != "step" and isinstance(v, float) and math.isfinite(v)})

  def close(self):
    if self._tb is not None:
      self._tb.close()


class MetricsWindow:
  """A metrics row holds the means over the steps since the previous row, as TRL's trainers log
  them (the mean of each step's value): steps whose loss or gradient is non-finite (skipped
  under config.nonfinite='skip') are left out. AT_STEP keys, and the loss state's (BCO's δ and
  its count), are the row's own step's values. The sums stay on the devices between rows (no
  host sync per step). `saved()` goes into each checkpoint's metadata, so a run resumed between
  two rows writes an uninterrupted run's rows."""
  AT_STEP = ("learning_rate", "nonfinite", "skipped_steps")

  def __init__(self, saved: dict | None = None, at_step: tuple[str, ...] = ()):
    import jax   # noqa: PLC0415
    self.at_step = self.AT_STEP + tuple(at_step)
    self._add = jax.jit(_add_step)
    self._open = jax.jit(lambda m: _add_step(self._zeros(m), m))   # a window's first step
    self._start = saved if saved and saved.get("steps") else None
    self._sums = None

  def _zeros(self, metrics: dict) -> dict:
    return {"steps": 0.0, "sums": {k: 0.0 for k in metrics if k not in self.at_step}}

  def add(self, metrics: dict):
    """Adds one step's metrics (device scalars, as the train step returns them)."""
    if self._sums is not None:
      self._sums = self._add(self._sums, metrics)
    elif self._start is None:
      self._sums = self._open(metrics)
    else:   # resumed between two rows: the sums saved with the checkpoint, on the metrics' devices
      import jax   # noqa: PLC0415
      put = lambda v, like: jax.device_put(np.float32(v), like.sharding)
      start = {"steps": put(self._start["steps"], metrics["loss"]),
               "sums": {k: put(self._start["sums"].get(k, 0.0), metrics[k])
                        for k in self._zeros(metrics)["sums"]}}
      self._start = None
      self._sums = self._add(start, metrics)

  def saved(self) -> dict:
    """The open window as JSON floats (exact: f32 values written as f64)."""
    if self._sums is None:
      return self._start or {"steps": 0.0, "sums": {}}
    import jax   # noqa: PLC0415
    sums = jax.device_get(self._sums)
    return {"steps": float(sums["steps"]), "sums": {k: float(v) for k, v in sums["sums"].items()}}

  def row(self, metrics: dict) -> dict:
    """The row for the step whose metrics these are (host floats); the next window starts."""
    import jax   # noqa: PLC0415
    window, metrics = jax.device_get((self._sums, metrics))
    self._sums = None
    row = {k: float(v) for k, v in metrics.items()}
    if window is not None and window["steps"] > 0:   # else every step was non-finite: as is
      n = np.float32(window["steps"])
      row.update({k: float(np.float32(s) / n) for k, s in window["sums"].items()})
    return row


def _add_step(window: dict, metrics: dict) -> dict:
  import jax.numpy as jnp   # noqa: PLC0415
  ok = metrics["nonfinite"] == 0
  return {"steps": window["steps"] + ok.astype(jnp.float32),
          "sums": {k: s + jnp.where(ok, metrics[k], 0.0) for k, s in window["sums"].items()}}


class EventFile:
  """A TensorBoard event file of scalars: Event protocol buffers in TFRecord framing, encoded
  here (tensorboardX, used before, imports torch when it is installed: 1.6-2 s at every start).

  The file begins with a SessionLog START at purge_step, so TensorBoard drops the steps from
  purge_step on that earlier files (an interrupted run) hold. Files sort by name in the order
  they were opened, which is the order TensorBoard reads them in.
  """

  def __init__(self, directory: str, purge_step: int):
    os.makedirs(directory, exist_ok=True)
    ns = time.time_ns()
    name = f"events.out.tfevents.{ns // 10**9:010d}.{socket.gethostname()}.{ns % 10**9:09d}"
    self.path = os.path.join(directory, name)
    self._f = open(self.path, "ab")
    self._write(purge_step, _pb_bytes(3, b"brain.Event:2"))   # Event.file_version
    self._write(purge_step, _pb_bytes(7, _pb_key(1, 0) + _varint(1)))   # SessionLog START

  def scalars(self, step: int, values: dict[str, float]):
    """One Event at `step` with a Summary.Value(tag, simple_value) per entry."""
    with np.errstate(over="ignore"):   # float32, as TensorBoard stores it: past its range, ±inf
      summary = b"".join(_pb_bytes(1, _pb_bytes(1, tag.encode()) + _pb_key(2, 5)
                                   + np.array(value, "<f4").tobytes())
                         for tag, value in values.items())
    self._write(step, _pb_bytes(5, summary))

  def _write(self, step: int, fields: bytes):
    event = (_pb_key(1, 1) + struct.pack("<d", time.time())   # wall_time
             + _pb_key(2, 0) + _varint(step) + fields)
    header = struct.pack("<Q", len(event))
    self._f.write(header + struct.pack("<I", masked_crc32c(header))
                  + event + struct.pack("<I", masked_crc32c(event)))
    self._f.flush()

  def close(self):
    self._f.close()


def _varint(n: int) -> bytes:
  out = bytearray()
  while n > 0x7F:
    out.append(n & 0x7F | 0x80)
    n >>= 7
  return bytes(out + bytes([n]))


def _pb_key(field: int, wire_type: int) -> bytes:
  return _varint(field << 3 | wire_type)


def _pb_bytes(field: int, payload: bytes) -> bytes:
  """A length-delimited protobuf field (a string or an embedded message)."""
  return _pb_key(field, 2) + _varint(len(payload)) + payload


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    for _ in range(8):
      i = (i >> 1) ^ 0x82F63B78 if i & 1 else i >> 1
    table.append(i)
  return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), which TFRecord framing uses."""
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC32C[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


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
