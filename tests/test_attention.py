"""Query-chunked attention (model.attention_chunk) and jax.nn.dot_product_attention
(model.attention_impl) equal the one-block einsum attention: hidden states, per-sequence log-probs
and their gradients, on every row layout (padded, packed, shared prompt) and with a sliding
window. The cuDNN path is checked to lower to cuDNN's fused flash attention, forward and
backward."""
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.data import packing, preference
from dpo_jax.data.preference import Tokenized
from dpo_jax.models import core, layers, load, logprobs
from dpo_jax.models.config import ModelConfig
from helpers import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import attention_skip  # noqa: E402

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
def test_attention_variants_equal_one_block(layout, window):
  batch = jax.tree.map(jnp.asarray, layouts()[layout])
  base = CFG.replace(family="mistral" if window else "llama", sliding_window=window)
  params = core.init_params(base, 0)

  def run(**variant):
    cfg = base.replace(**variant)
    graphdef = core.split(cfg)[0]

    def f(p):
      model = core.merge(graphdef, p)
      out = logprobs.sequence_logps(model, batch, chunk=32, tokens=True)
      hidden, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"])
      return jnp.sum(out["logps"]), (out, hidden)
    return jax.jit(jax.value_and_grad(f, has_aux=True), compiler_options=FAST_COMPILE)(params)

  (ref_loss, (ref_out, ref_hidden)), ref_grads = run()
  length = batch["tokens"].shape[1]
  # Chunks not dividing L; one short chunk at the end; the library attention (XLA on CPU).
  # Chunks inside a rematerialised layer (remat=full) as well as CFG's remat=none.
  for variant in ({"attention_chunk": 24}, {"attention_chunk": length - 1},
                  {"attention_chunk": 24, "remat": "full"}, {"attention_impl": "xla"}):
    (loss, (out, hidden)), grads = run(**variant)
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


def test_attention_core_ops_carry_the_profile_scope():
  """benchmarks/op_profile.py counts the ops whose name carries layers.ATTENTION_SCOPE as the
  attention core: in the compiled forward+backward every score and weighted-value dot (the
  attention einsums, in query chunks or one block) carries it, and the projections' do not."""
  batch = jax.tree.map(jnp.asarray, layouts()["packed"])
  params = core.init_params(CFG, 0)
  for chunk in (0, 24):
    graphdef = core.split(CFG.replace(attention_chunk=chunk))[0]

    def f(p):
      hidden, _ = core.merge(graphdef, p)(batch["tokens"], batch["positions"],
                                          batch["segment_ids"])
      return jnp.sum(hidden ** 2)
    hlo = jax.jit(jax.grad(f), compiler_options=FAST_COMPILE).lower(params).compile().as_text()
    names = set(re.findall(r'op_name="([^"]+)"', hlo))
    attention = {n for n in names if "bkgls" in n}    # the two einsums of dot_product_attention
    assert attention and all(layers.ATTENTION_SCOPE in n for n in attention), attention
    outside = {n for n in names if n.endswith("dot_general") and "bkgls" not in n}
    assert outside and not any(layers.ATTENTION_SCOPE in n for n in outside), outside


@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
def test_attention_skip_benchmark_variants_equal_chunked_attention(layout):
  """benchmarks/attention_skip.py: block_spans equals a NumPy count from the mask, and its
  row-by-row variants (full span, and lax.switch skipping the blocks no query of a chunk sees)
  give chunked_attention's outputs and gradients at real tokens."""
  batch = layouts()[layout]
  pos, seg = (jnp.asarray(batch[k]) for k in ("positions", "segment_ids"))
  b, length = pos.shape
  chunk, window = 32, None
  spans = np.asarray(attention_skip.block_spans(pos, seg, window, chunk))
  mask = np.asarray(layers.attention_mask(pos, seg, pos, seg, window))
  for r in range(b):
    for i in range(-(-length // chunk)):
      cols = np.flatnonzero(mask[r, i * chunk:(i + 1) * chunk].any(0))
      assert spans[r, i] == (i + 1 - cols[0] // chunk if cols.size else 0), (r, i)
  assert spans.sum() < b * spans.shape[1] * (spans.shape[1] + 1) // 2   # something to skip
  rng = np.random.default_rng(0)
  q, g = (jnp.asarray(rng.standard_normal((b, length, 4, 8), np.float32)) for _ in range(2))
  k, v = (jnp.asarray(rng.standard_normal((b, length, 2, 8), np.float32)) for _ in range(2))
  real = (seg > 0)[:, :, None, None]

  def run(f):   # the output at real tokens, and dq, dk, dv of sum(output * g)
    def both(q, k, v):
      out, pullback = jax.vjp(lambda q, k, v: jnp.where(real, f(q, k, v), 0), q, k, v)
      return (out, *pullback(g))
    return jax.jit(both, compiler_options=FAST_COMPILE)(q, k, v)
  want = run(lambda q, k, v: layers.chunked_attention(q, k, v, pos, seg, window, chunk))
  for skip in (False, True):
    got = run(lambda q, k, v: attention_skip.per_row_attention(q, k, v, pos, seg, window, chunk,
                                                                skip=skip))
    for x, y, what in zip(got, want, ("output", "dq", "dk", "dv")):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5, err_msg=f"skip={skip} {what}")


@pytest.mark.parametrize("fields,pattern", [
    ({"attention_impl": "flash"},
     r"model.attention_impl must be one of \('einsum', 'xla', 'cudnn'\)"),
    ({"attention_impl": "xla", "attention_chunk": 64}, r"model.attention_chunk=64 applies to"),
    ({"attention_impl": "cudnn"}, r"model.attention_impl='cudnn' needs model.dtype"),
])
def test_attention_config_errors_name_the_key(fields, pattern):
  with pytest.raises(ValueError, match=pattern):
    CFG.replace(**fields)
  cudnn = CFG.replace(attention_impl="cudnn", dtype="bfloat16")   # a valid config, but:
  with pytest.raises(ValueError, match=r"attention_impl='cudnn' needs an NVIDIA GPU.*'cpu'"):
    load.model_config(None, cudnn)


def test_checkpoint_attention_kernel_is_the_callers(monkeypatch):
  """A checkpoint saved by a run with attention_impl='cudnn' (its model_numerics) loads on this
  CPU with the default kernel, or the one the caller passes; the rest of its config is kept."""
  saved = CFG.replace(attention_impl="cudnn", dtype="bfloat16")
  monkeypatch.setattr(load, "source_kind", lambda path: "checkpoint")
  monkeypatch.setattr(load.checkpoint, "load_model_config", lambda path: (saved, {}))
  assert load.model_config("ckpt", CFG) == saved.replace(attention_impl="einsum")
  assert load.model_config("ckpt", CFG, attention_impl="xla").attention_impl == "xla"


@pytest.mark.parametrize("layout", ["padded", "shared"])
def test_cudnn_attention_lowers_to_fused_flash_attention(layout, monkeypatch):
  """model.attention_impl='cudnn' lowered for CUDA (on this CPU machine: lowering only, the
  kernel is not run) uses cuDNN's fused flash attention with the causal mask type, forward
  and backward. There is no GPU here, so cuDNN's version query is replaced by
  a fixed version; the shape, dtype and layout checks of jax's cuDNN wrapper all run."""
  from jax._src.cudnn import fused_attention_stablehlo
  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)
  batch = jax.tree.map(jnp.asarray, layouts()[layout])
  cfg = CFG.replace(hidden_size=64, num_heads=4, num_kv_heads=2, dtype="bfloat16",
                    attention_impl="cudnn", remat="full", scan_layers=False)
  graphdef, params = core.split(cfg)[0], core.init_params(cfg, 0)

  def f(p):
    out = logprobs.sequence_logps(core.merge(graphdef, p), batch, chunk=32)
    return jnp.sum(out["logps"])
  text = jax.jit(jax.grad(f)).trace(params).lower(lowering_platforms=("cuda",)).as_text()
  calls = re.findall(r"custom_call @(__cudnn\$fmha\w+)\(.*?backend_config = \"(.*?)\", ", text)
  kinds = {name for name, _ in calls}
  assert kinds == {"__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"}, kinds
  for _, config in calls:
    assert "is_flash_attention\\22: true" in config, config[:400]
    assert "mask_type\\22: \\22CAUSAL" in config, config[:400]
  # The backward returns dq, dk, dv and its workspace, and no gradient for the [B, 1, L, L]
  # bias that jax builds from the mask (layers._no_mask_bias_gradient).
  results = re.findall(r"custom_call @__cudnn\$fmhaScaleBiasSoftmaxBackward\(.*-> \((.*)\)$",
                       text, re.M)
  assert results, "no cuDNN backward call"
  length = batch["tokens"].shape[1]
  for outputs in results:
    shapes = re.findall(r"tensor<([^>]*)>", outputs)
    assert len(shapes) == 4 and shapes[-1].endswith("ui8"), outputs
    assert not any(x.startswith(f"{batch['tokens'].shape[0]}x1x{length}x{length}")
                   for x in shapes), outputs
  assert fused_attention_stablehlo.should_export_dbias(None, None, None)   # restored


def test_cudnn_train_step_lowers_for_cuda_on_a_mesh(monkeypatch):
  """The whole bf16 train step (policy forward+backward, reference forward, loss, AdamW) with
  attention_impl='cudnn', on a (data, fsdp, tensor) = (2, 2, 2) mesh with shared-prompt rows,
  traces and lowers for CUDA. jax's cuDNN attention comes with its own SPMD partitioner: on a
  mesh it lowers to CustomSPMDPartitioning calls (one per scanned layer loop: policy forward,
  its rematerialised backward = forward + backward, reference forward), which become the
  fused kernels when XLA partitions the program; on one device they are the kernels."""
  from jax._src.cudnn import fused_attention_stablehlo
  from dpo_jax import bench, configlib
  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)
  monkeypatch.setattr(load.jax, "default_backend", lambda: "gpu")   # the setup check only
  assert jax.device_count() == 8

  def lowered(devices, **keys):
    c = bench.get_config()
    for k, v in {"model.hidden_size": 64, "model.intermediate_size": 128,
                 "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2,
                 "model.vocab_size": 256, "model.dtype": "bfloat16",
                 "model.attention_impl": "cudnn", "model.remat": "full", "batch": 8,
                 "seq": 64, **keys}.items():
      configlib.set_key(c, k, v)
    run, batch, _ = bench.prepare(c, devices)
    return run.jit_train_step().trace(run.state, run.frozen, batch).lower(
        lowering_platforms=("cuda",)).as_text()

  one = lowered(jax.devices()[:1])
  assert set(re.findall(r"custom_call @(__cudnn\$fmha\w+)\(", one)) == {
      "__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"}
  mesh = lowered(jax.devices(), **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                                   "share_prompt": True})
  assert mesh.count("custom_call @CustomSPMDPartitioning(") == 4
