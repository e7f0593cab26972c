"""Query-chunked attention (model.attention_chunk) equals the one-block attention: hidden states,
per-sequence log-probs and their gradients, on every row layout (padded, packed, shared prompt)
and with a sliding window."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.data import packing, preference
from dpo_jax.data.preference import Tokenized
from dpo_jax.models import core, logprobs
from dpo_jax.models.config import ModelConfig

PAD = 0


def examples(n=6, seed=0):
  rng = np.random.default_rng(seed)
  tok = lambda lo, hi: [int(x) for x in rng.integers(1, 200, int(rng.integers(lo, hi)))]
  return [Tokenized(tok(3, 20), tok(2, 30), tok(2, 30), 1.0) for _ in range(n)]


def layouts():
  ex = examples()
  return {
      "padded": preference.collate(ex, (64,), PAD),
      "packed": packing.pack(ex, row_length=96, pad_id=PAD, max_length=64),
      "shared": packing.pack(ex, row_length=112, pad_id=PAD, max_length=64, share_prompt=True),
  }


# LLVM -O0 for the CPU code: both sides of every comparison are compiled the same way.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
CFG = ModelConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, remat="none")


@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
def test_chunked_attention_equals_one_block(layout, window):
  batch = jax.tree.map(jnp.asarray, layouts()[layout])
  base = CFG.replace(family="mistral" if window else "llama", sliding_window=window)
  params = core.init_params(base, 0)

  def run(chunk):
    cfg = base.replace(attention_chunk=chunk)
    graphdef = core.split(cfg)[0]

    def f(p):
      model = core.merge(graphdef, p)
      out = logprobs.sequence_logps(model, batch, chunk=32, tokens=True)
      hidden, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"])
      return jnp.sum(out["logps"]), (out, hidden)
    return jax.jit(jax.value_and_grad(f, has_aux=True), compiler_options=FAST_COMPILE)(params)

  (ref_loss, (ref_out, ref_hidden)), ref_grads = run(0)
  length = batch["tokens"].shape[1]
  for chunk in (24, length - 1):   # not dividing L; one short chunk at the end
    (loss, (out, hidden)), grads = run(chunk)
    seg = np.asarray(batch["segment_ids"]) > 0
    np.testing.assert_allclose(np.asarray(hidden)[seg], np.asarray(ref_hidden)[seg],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for k in ref_out:
      np.testing.assert_allclose(out[k], ref_out[k], rtol=1e-5, atol=1e-5, err_msg=k)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale),
                 grads, ref_grads)


def test_chunked_attention_skips_masked_blocks_and_bounds_scores(capsys):
  """The compiled forward+backward of a long row does fewer FLOPs (the blocks above the
  diagonal are never computed) and needs less temporary memory than one [L, L] block."""
  cfg = CFG.replace(num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=4)
  n = 2048
  batch = {"tokens": jnp.ones((2, n), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (2, n)),
           "segment_ids": jnp.ones((2, n), jnp.int32)}
  params = core.init_params(cfg, 0)

  def compiled(chunk):
    graphdef = core.split(cfg.replace(attention_chunk=chunk))[0]

    def f(p):
      hidden, _ = core.merge(graphdef, p)(batch["tokens"], batch["positions"],
                                          batch["segment_ids"])
      return jnp.sum(hidden ** 2)
    return jax.jit(jax.grad(f)).lower(params).compile()

  dense, chunked = compiled(0), compiled(64)
  flops = lambda c: c.cost_analysis()["flops"] if isinstance(c.cost_analysis(), dict) else (
      c.cost_analysis()[0]["flops"])
  temp = lambda c: c.memory_analysis().temp_size_in_bytes
  with capsys.disabled():
    print(f"\n2 rows x {n}, 1 layer, 4 heads: forward+backward {flops(dense) / 1e9:.2f} -> "
          f"{flops(chunked) / 1e9:.2f} GFLOP, temporaries {temp(dense) / 2**20:.1f} -> "
          f"{temp(chunked) / 2**20:.1f} MiB with query chunks of 64")
  assert flops(chunked) < 0.7 * flops(dense)
  assert temp(chunked) < 0.5 * temp(dense), (temp(chunked), temp(dense))
