"""Training entry point.

    python -m dpo_jax.main --config configs/dpo.py[:args] --workdir W [--config.key=value ...]

Re-running the same command on W resumes from W's latest checkpoint.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

from dpo_jax import configlib

config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for metrics, TensorBoard events, checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # Orbax logs every file operation at INFO
  import jax   # noqa: PLC0415  (after absl parsed flags, so XLA_FLAGS from the env apply)
  from dpo_jax import distributed, pipeline, train   # noqa: PLC0415

  if "://" in flags.FLAGS.workdir:
    raise app.UsageError(
        f"--workdir={flags.FLAGS.workdir}: dpo_jax writes metrics, caches and checkpoints with "
        "file-system calls; give a path (with several hosts, one that every host mounts: NFS, "
        "Filestore, or a bucket mounted with gcsfuse)")
  distributed.maybe_initialize()
  config = flags.FLAGS.config
  workdir = os.path.abspath(flags.FLAGS.workdir)
  if jax.process_index() == 0:
    print(distributed.device_line(), flush=True)
  try:
    if "stages" in config:   # several stages, each in workdir/<stage>
      results = pipeline.run(config, workdir)
      if jax.process_index() == 0:
        pipeline.print_summary(workdir, results)
      return
    metrics = train.train_and_evaluate(config, workdir)
  except distributed.Preempted as e:   # SIGTERM / SIGINT: checkpoint saved, exit 0
    print(f"preempted: {e}", flush=True)
    return
  if jax.process_index() == 0:
    train.print_summary(workdir, metrics)


if __name__ == "__main__":
  app.run(main, flags_parser=configlib.parse_flags)
