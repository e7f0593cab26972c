"""Host memory on CPU: XLA:CPU's step buffer can be kept for the next step instead of being mapped
afresh every call.

XLA:CPU allocates all of a call's temporaries as one buffer, from one of its worker threads
(811 MB on the side-by-side benchmark's shape). glibc serves a request that large with a fresh
mmap and unmaps it when it is freed, so every step writes to new 4 KiB pages and takes a page
fault on each (about 200k per step there). With DPO_JAX_CPU_MALLOC=heap, `use_heap()` has glibc
serve every thread from its main heap (mallopt M_ARENA_MAX = 1), without mmap (M_MMAP_MAX = 0),
and keep up to 2 GiB of freed memory at the heap's top (M_TRIM_THRESHOLD), so the next step
reuses the same pages.

It is opt-in because it has costs. All threads share one malloc arena, so a workload of many
small calls gets slower. Memory freed below the heap's top is not returned to the OS, so the
resident size stays near its peak, and that peak is higher: XLA asks for the buffer with
posix_memalign, which glibc serves by carving size + alignment + 32 bytes, so the previous
step's freed block of exactly `size` fits only once it has merged with a free neighbour. Until
then the heap grows by another buffer (one to three extra buffers on the side-by-side shape).
docs/performance.md has the measurements both ways.

It has to run before any library starts a thread (JAX's CPU client, tensorstore's pools): each
thread takes its malloc arena when it first allocates, and one that already has another arena
keeps mapping large buffers afresh. So the setting is read from the environment when dpo_jax is
first imported (dpo_jax/__init__.py), which every `python -m dpo_jax.*` command does before
anything else; a script that imports jax or orbax before dpo_jax gets it only in part.
`system` (the default) leaves malloc as it is. A C library other than glibc is left as it is
too, and so is a process whose malloc comes from another library (an LD_PRELOADed tcmalloc or
jemalloc: glibc's mallopt would not reach it, and tcmalloc's own mallopt accepts and ignores
the settings). Preloading tcmalloc is the alternative docs/performance.md measures.
"""
import ctypes
import os
import platform

ENV = "DPO_JAX_CPU_MALLOC"
CHOICES = ("system", "heap")
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8   # glibc's <malloc.h>
_HEAP = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
_applied = []


def use_heap() -> str:
  """Applies DPO_JAX_CPU_MALLOC once per process and returns what is in effect: 'heap' or
  'system' (also when heap was asked for but the C library is not glibc, or malloc is not
  glibc's; where dladdr cannot say, glibc's is assumed, as before the check existed)."""
  if _applied:
    return _applied[0]
  choice = os.environ.get(ENV, "system")
  if choice not in CHOICES:
    raise ValueError(f"{ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
  mode = "system"
  if (choice == "heap" and platform.libc_ver()[0] == "glibc"
      and provider("malloc") == provider("gnu_get_libc_version")):
    mallopt = ctypes.CDLL(None).mallopt
    if all(mallopt(param, value) == 1 for param, value in _HEAP):
      mode = "heap"
  _applied.append(mode)
  return mode


class _DlInfo(ctypes.Structure):
  _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
              ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def provider(symbol: str):
  """The file of the shared object whose `symbol` this process calls (dladdr of what the
  dynamic linker resolves it to), or None when it cannot tell."""
  process = ctypes.CDLL(None)
  try:
    address = ctypes.cast(getattr(process, symbol), ctypes.c_void_p)
    dladdr = process.dladdr
  except AttributeError:
    return None
  info = _DlInfo()
  dladdr.argtypes = (ctypes.c_void_p, ctypes.POINTER(_DlInfo))
  if not dladdr(address, ctypes.byref(info)) or not info.dli_fname:
    return None
  return os.fsdecode(info.dli_fname)


def in_effect() -> str:
  """'heap' when use_heap() applied it in this process, else 'system'."""
  return _applied[0] if _applied else "system"
