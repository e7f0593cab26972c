"""Multi-host start-up: jax.distributed is initialised when the environment asks for it.

TPU VM pod: run the same command on every worker (`gcloud compute tpus tpu-vm ssh ... --worker=all
--command=...`) with DPO_JAX_DISTRIBUTED=1; JAX discovers the coordinator from the TPU metadata.
Multi-node GPU: set DPO_JAX_DISTRIBUTED=1 plus JAX_COORDINATOR_ADDRESS=host:port,
JAX_NUM_PROCESSES and JAX_PROCESS_ID on each node; under SLURM or Open MPI JAX reads what is unset
from their variables, and one process per node needs JAX_LOCAL_DEVICE_IDS=0,1,...
(experiments/launch_gpu_node.sh sets it). Single host: nothing to do.

Every entry point that runs a model calls maybe_initialize(): training (dpo_jax.main) and the
score, rank and export tools, so each runs on a pod the same way (the same command on every
host). Calling it again in the same process does nothing.

A host that dies hard (SIGKILL, a lost VM) ends the job: if it ran the coordinator (process 0)
the others abort at once, otherwise when its heartbeat times out (JAX's default 100 s;
DPO_JAX_HEARTBEAT_TIMEOUT_S sets it). The same command then resumes from the last checkpoint.

With several processes they also share the tokenising (tokenize_split, allgather_bytes), and a
signal on one host stops every host after the same step (StopAgreement, host-side RPCs).
"""
import itertools
import os

import jax
import numpy as np


ON, OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def _int_env(name: str) -> int:
  try:
    return int(os.environ[name])
  except ValueError:
    raise ValueError(f"{name}={os.environ[name]!r} must be an integer") from None


def maybe_initialize() -> bool:
  """jax.distributed.initialize() when DPO_JAX_DISTRIBUTED says so (1/true/yes/on; 0/false/no/off
  or unset: one process). JAX_NUM_PROCESSES and JAX_PROCESS_ID are passed when set; JAX itself
  reads JAX_COORDINATOR_ADDRESS and JAX_LOCAL_DEVICE_IDS, and detects what is unset from TPU
  metadata, SLURM or Open MPI (under SLURM it gives a process only GPU $SLURM_LOCALID unless
  JAX_LOCAL_DEVICE_IDS lists the node's GPUs: experiments/launch_gpu_node.sh sets it)."""
  flag = os.environ.get("DPO_JAX_DISTRIBUTED", "0")
  if flag.strip().lower() not in ON + OFF:
    raise ValueError(f"DPO_JAX_DISTRIBUTED={flag!r}: use 1 (initialise jax.distributed, "
                     f"multi-host) or 0 (one process)")
  if flag.strip().lower() in OFF:
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs = {key: _int_env(name) for name, key in (
      ("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id"),
      ("DPO_JAX_HEARTBEAT_TIMEOUT_S", "heartbeat_timeout_seconds"))   # JAX's default: 100 s
            if name in os.environ}
  jax.distributed.initialize(**kwargs)
  return True


def device_line() -> str:
  """e.g. 'devices:      8 cpu (4 per process × 2 processes)', printed by process 0."""
  n = jax.process_count()
  return (f"devices:      {jax.device_count()} {jax.default_backend()} "
          f"({jax.local_device_count()} per process × {n} process{'es' if n > 1 else ''})")


def tokenize_split() -> dict:
  """preference.tokenize_rows's keywords for sharing the tokenising among the processes: process i
  of n tokenises every n-th row and the parts are exchanged (allgather_bytes). One process: {}."""
  if jax.process_count() == 1:
    return {}
  return {"part": (jax.process_index(), jax.process_count()), "exchange": allgather_bytes}


def allgather_bytes(blob: bytes, chunk: int = 1 << 26) -> list[bytes]:
  """Every process's bytes, in process order, through a device all-gather (the interconnect,
  not the coordinator) in chunks of at most `chunk` bytes per process."""
  from jax.experimental import multihost_utils   # noqa: PLC0415
  sizes = multihost_utils.process_allgather(np.int32(len(blob))).tolist()
  longest = max(sizes)
  data = np.zeros(longest, np.uint8)
  data[:len(blob)] = np.frombuffer(blob, np.uint8)
  parts = [multihost_utils.process_allgather(data[at:at + chunk])
           for at in range(0, longest, chunk)]
  whole = np.concatenate(parts, axis=1)
  return [whole[p, :n].tobytes() for p, n in enumerate(sizes)]


def kv_client():
  """jax.distributed's key-value client (the coordination service), or None for one process."""
  from jax._src import distributed   # noqa: PLC0415  (JAX has no public accessor for it)
  return distributed.global_state.client


class StopAgreement:
  """Makes every process stop after the same step when one of them is told to stop.

  Host-side only: the processes talk through jax.distributed's key-value store (one or two RPCs
  per step; a check took 1.4-1.7 ms in benchmarks/stop_check_cost.py), not through a device
  collective, which would queue behind the step just dispatched and cost the host its lead over
  the devices.

  A process told to stop posts a notice. Every process posts the step r at which it first sees a
  notice, and all stop after step max(r) + LEAD. A process that reaches its own r + LEAD before
  every process has posted waits there for the rest. That wait cannot deadlock, provided the
  caller finishes step s - 1 before it asks about step s (train.py's loop does, reading each
  step's NaN flag one step later) and every step has a collective over all processes (train's
  does: sharding.make_mesh spans every device of every process, and the loss is a mean over the
  global batch, so its gradient is reduced across all of them). Then no
  process is more than a step ahead of another, so every process that has not posted yet
  reaches its next check needing from the others only steps, checkpoints and logs up to r + 1,
  all of which a waiting process has already done.
  """
  LEAD = 2

  def __init__(self, client, process: int, processes: int, namespace: str,
               timeout_s: float = 1800):
    self.client, self.process, self.processes = client, process, processes
    self.ns, self.timeout_ms = namespace, int(timeout_s * 1000)
    self.notified, self.mine, self.stop_at, self.notice = False, None, None, None

  def should_stop(self, step: int, notice: str | None) -> bool:
    """Called after every step with this process's own notice (None if it has none)."""
    if self.stop_at is None:
      if notice is not None and not self.notified:
        self.client.key_value_set(f"{self.ns}/notice/{self.process}", notice)
        self.notified = True
      posted = dict(self.client.key_value_dir_get(f"{self.ns}/"))
      notices = sorted(v for k, v in posted.items() if "/notice/" in k)
      if not notices:
        return False
      self.notice = notice or notices[0]
      if self.mine is None:
        self.mine = step
        self.client.key_value_set(f"{self.ns}/step/{self.process}", str(step))
        posted[f"{self.ns}/step/{self.process}"] = str(step)
      steps = {int(k.rsplit("/", 1)[1]): int(v) for k, v in posted.items() if "/step/" in k}
      if len(steps) < self.processes and step >= self.mine + self.LEAD:
        steps = self._wait_for_all(steps)
      if len(steps) == self.processes:
        self.stop_at = max(steps.values()) + self.LEAD
    return self.stop_at is not None and step >= self.stop_at

  def _wait_for_all(self, steps: dict) -> dict:
    for p in range(self.processes):
      if p not in steps:
        try:
          steps[p] = int(self.client.blocking_key_value_get(f"{self.ns}/step/{p}", self.timeout_ms))
        except Exception as e:
          raise RuntimeError(
              f"process {self.process} is stopping ({self.notice}) but process {p} did not "
              f"report its step within {self.timeout_ms / 1000:g} s") from e
    return steps


class Preempted(Exception):
  """Training stopped on SIGTERM/SIGINT after saving a checkpoint; the same command resumes."""


class PreemptionFlag:
  """Turns SIGTERM (TPU preemption, scheduler kill) and SIGINT into a stop after a step. One
  process stops after the step it was signalled in; several agree on a step a little later
  (StopAgreement), so every host saves the same step."""
  _runs = itertools.count()   # one key namespace per training run in this process

  def __init__(self, signals=("SIGTERM", "SIGINT")):
    import signal   # noqa: PLC0415
    import threading   # noqa: PLC0415
    self._set, self.signal_name, self._old = False, None, {}
    self._agreement = None
    if jax.process_count() > 1:
      self._agreement = StopAgreement(
          kv_client(), jax.process_index(), jax.process_count(),
          f"dpo_jax/preempt/{next(PreemptionFlag._runs)}")
    if threading.current_thread() is not threading.main_thread():
      return   # signal handlers can only be installed from the main thread
    for name in signals:
      sig = getattr(signal, name)
      self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    import signal   # noqa: PLC0415
    del frame
    self._set, self.signal_name = True, signal.Signals(signum).name

  def is_set(self, step: int) -> bool:
    if self._agreement is None:
      return self._set
    own = f"{self.signal_name} on process {jax.process_index()}" if self._set else None
    stop = self._agreement.should_stop(step, own)
    if stop and not self._set:
      self.signal_name = self._agreement.notice
    return stop

  def raise_if_late(self, step: int, directory):
    """A signal after the last step's check (during the final save, say) still stops this
    process, so that a pipeline's next stage does not start. Several processes agree on a stop
    step inside the loop only (StopAgreement): there a late signal is left to the scheduler."""
    if self._set and self._agreement is None:
      raise Preempted(f"stopped by {self.signal_name} after the last step {step}; the run is "
                      f"complete and its checkpoint saved in {directory}")

  def restore(self):
    import signal   # noqa: PLC0415
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}
