"""Exports a dpo_jax checkpoint as a Hugging Face model directory (safetensors + tokenizer).

    python -m dpo_jax.export --checkpoint W[/checkpoints[/STEP]] --out DIR [--dtype bfloat16]

DIR then loads with transformers' AutoModelForCausalLM.from_pretrained(DIR) and serving engines.
"""
import argparse


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m dpo_jax.export", description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--dtype", default=None, help="weights dtype on disk (default: as trained)")
  p.add_argument("--max_shard_gb", type=float, default=5.0)
  args = p.parse_args(argv)
  import jax   # noqa: PLC0415
  from dpo_jax import distributed, sharding   # noqa: PLC0415
  from dpo_jax.models import TINY, hf_io, load   # noqa: PLC0415
  from dpo_jax.models.config import check_dtype   # noqa: PLC0415

  if args.dtype is not None:
    check_dtype(args.dtype, "--dtype")   # before the checkpoint is read
  distributed.maybe_initialize()   # on a pod: every host runs this; process 0 writes
  cfg = load.model_config(args.checkpoint, TINY)
  mesh = sharding.make_mesh()
  params = load.load_params(args.checkpoint, cfg, mesh, sharding.DEFAULT_RULES)
  hf_io.save_hf(args.out, cfg, params, tokenizer=load.load_tokenizer(args.checkpoint),
                dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30),
                generation_config=load.generation_config(args.checkpoint))
  if jax.process_index() == 0:
    print(f"exported {args.checkpoint} -> {args.out}")


if __name__ == "__main__":
  main()
