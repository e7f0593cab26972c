"""What scoring only completion positions saves (config.data.score_parts), counted by XLA.

    python benchmarks/scoring_flops.py [--seq 2048] [--prompt-fraction 0.5] [--rows 2]

For each model shape (the side-by-side benchmark's tiny Llama, Qwen2-0.5B, Llama-3.2-1B and
Llama-3.1-8B, built from their configs' numbers, with abstract weights: nothing is allocated or
downloaded), lowers and compiles the DPO step's model compute, i.e. the policy's per-sequence
log-probs forward + backward and the reference's forward, on `rows` rows of `seq` tokens whose
first prompt-fraction are prompt, once with the score_index (unembedding on the completion
positions only) and once without (every position). Prints XLA's own FLOP count
(compiled.cost_analysis()) for both and the saving. On CPU the compile takes a few seconds per
shape; the numbers are the compiled program's, so they hold for any backend XLA counts alike.
"""
import argparse
import os


SHAPES = {   # name: ModelConfig fields (from the models' published configs)
    "side-by-side tiny Llama (V=2048)": dict(vocab_size=2048, hidden_size=256,
                                            intermediate_size=1024, num_layers=4, num_heads=4,
                                            num_kv_heads=4, tie_word_embeddings=False),
    "Qwen2-0.5B (V=151936)": dict(family="qwen2", vocab_size=151936, hidden_size=896,
                                  intermediate_size=4864, num_layers=24, num_heads=14,
                                  num_kv_heads=2, tie_word_embeddings=True),
    "Llama-3.2-1B (V=128256)": dict(vocab_size=128256, hidden_size=2048,
                                    intermediate_size=8192, num_layers=16, num_heads=32,
                                    num_kv_heads=8, tie_word_embeddings=True),
    "Llama-3.1-8B (V=128256)": dict(vocab_size=128256, hidden_size=4096,
                                    intermediate_size=14336, num_layers=32, num_heads=32,
                                    num_kv_heads=8, tie_word_embeddings=False),
}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--seq", type=int, default=2048)
  ap.add_argument("--prompt-fraction", type=float, default=0.5)
  ap.add_argument("--rows", type=int, default=2, help="rows [chosen; rejected] (even)")
  args = ap.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax   # noqa: PLC0415
  import jax.numpy as jnp   # noqa: PLC0415
  from dpo_jax import bench   # noqa: PLC0415
  from dpo_jax.data import preference   # noqa: PLC0415
  from dpo_jax.models import core, logprobs   # noqa: PLC0415
  from dpo_jax.models.config import ModelConfig   # noqa: PLC0415

  r, seq = args.rows, args.seq
  prompt = min(max(int(round(seq * args.prompt_fraction)), 1), seq - 1)
  # The bench's synthetic rows (only their shapes matter: the weights are abstract too).
  batch = preference.add_score_index(bench.synthetic_batch(r // 2, seq, 2, prompt))
  k = batch["score_index"].shape[1]
  every = {name: x for name, x in batch.items() if name != "score_index"}
  print(f"{r} rows x {seq} tokens, {prompt} prompt: unembedding on K={k} of {seq} positions "
        f"per row; policy fwd+bwd + reference fwd, XLA cost_analysis FLOPs")
  print(f"{'model':36s}{'every position':>16s}{'scored only':>14s}{'saving':>9s}")
  for name, fields in SHAPES.items():
    # No loops in the program: XLA's cost analysis counts a loop body once, so the layers are
    # unrolled, attention is one block and the log-probs are one chunk (compile only: the
    # memory this would take is never allocated).
    cfg = ModelConfig(**fields, remat="none", scan_layers=False, dtype="bfloat16",
                      max_position_embeddings=max(seq, 2048))
    graphdef, params, _ = core.split(cfg)

    def step(p, ref_p, b):
      def loss(p_):
        pol = logprobs.sequence_logps(core.merge(graphdef, p_), b, chunk=seq)
        ref = logprobs.sequence_logps(core.merge(graphdef, ref_p), b, chunk=seq)
        return jnp.sum(pol["logps"] - jax.lax.stop_gradient(ref["logps"]))
      return jax.grad(loss)(p)

    def cost(b):
      spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), b)
      c = jax.jit(step).lower(params, params, spec).compile().cost_analysis()
      return float((c[0] if isinstance(c, list) else c)["flops"])
    full, scored = cost(every), cost(batch)
    print(f"{name:36s}{full / 1e12:13.2f} TF{scored / 1e12:11.2f} TF{1 - scored / full:9.1%}",
          flush=True)


if __name__ == "__main__":
  main()
