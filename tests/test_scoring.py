"""Scoring only completion positions (batch["score_index"], config.data.score_parts): the
unembedding runs at the K scored positions of each row instead of all L, and every per-sequence
value, per-token value and gradient equals scoring every position, on every row layout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.data import packing, preference
from dpo_jax.data.preference import Tokenized
from dpo_jax.models import core, logprobs
from dpo_jax.models.config import ModelConfig

PAD = 0
FAST_COMPILE = {"xla_backend_optimization_level": 0}
CFG = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, remat="none")


def examples(n=6, seed=0, unpaired=False):
  rng = np.random.default_rng(seed)
  tok = lambda lo, hi: [int(x) for x in rng.integers(1, 300, int(rng.integers(lo, hi)))]
  return [Tokenized(tok(10, 40), tok(2, 20), None if unpaired else tok(2, 20), 1.0)
          for _ in range(n)]


def layouts():
  ex, un = examples(), examples(seed=1, unpaired=True)
  return {
      "padded": preference.collate(ex, (64,), PAD),
      "padded_unpaired": preference.collate(un, (64,), PAD),
      "packed": packing.pack(ex, row_length=96, pad_id=PAD, max_length=64),
      "shared": packing.pack(ex, row_length=128, pad_id=PAD, max_length=64, share_prompt=True),
  }


def test_score_index_lists_the_scored_positions():
  """Against a per-row Python restatement: the masked positions in order, then L; K is the
  smallest multiple of ceil(L/parts) that holds the fullest row; no index when K would be L."""
  rng = np.random.default_rng(0)
  for trial in range(200):
    lead = [(5,), (2, 3)][trial % 2]
    length = int(rng.integers(1, 40))
    parts = int(rng.integers(0, 6))
    mask = (rng.random((*lead, length)) < rng.random()).astype(np.float32)
    out = preference.add_score_index({"loss_mask": mask}, parts)
    rows = mask.reshape(-1, length)
    most = int(rows.sum(1).max())
    if parts == 0:
      assert "score_index" not in out
      continue
    q = -(-length // parts)
    k = max(q, -(-most // q) * q)
    if k >= length:
      assert "score_index" not in out
      continue
    index = out["score_index"]
    assert index.shape == (*lead, k) and index.dtype == np.int32
    for row, idx in zip(rows, index.reshape(-1, k)):
      want = [t for t in range(length) if row[t] > 0]
      assert list(idx) == want + [length] * (k - len(want))


def test_score_index_is_added_where_batches_are_made():
  ex = examples()
  padded = preference.collate(ex, (64,), PAD)
  most = int(padded["loss_mask"].sum(1).max())
  assert padded["score_index"].shape == (12, 16 * -(-most // 16))   # L=64: multiples of 16
  assert "score_index" not in preference.collate(ex, (64,), PAD, score_parts=0)
  assert "score_index" not in preference.collate(ex, (64,), PAD, score_parts=1)
  micro = packing.pack_microbatches(ex, 2, row_length=128, pad_id=PAD, max_length=64)
  assert micro["score_index"].shape[:2] == micro["tokens"].shape[:2]   # one K for both
  batches = preference.Batches(ex, 4, 0, (64,), PAD, score_parts=0)
  assert "score_index" not in batches(0)
  assert "score_index" in preference.Batches(ex, 4, 0, (64,), PAD)(0)
  eval_ = list(preference.eval_batches(ex, 4, (64,), PAD, score_parts=2))
  assert all(b["score_index"].shape[1] in (32,) for b in eval_)


@pytest.mark.parametrize("layout", ["padded", "padded_unpaired", "packed", "shared"])
def test_scored_positions_equal_every_position(layout):
  """sequence_logps with every statistic, per-token values and an in-step teacher's token KL,
  and the gradient, with and without the score_index."""
  batch = jax.tree.map(jnp.asarray, layouts()[layout])
  assert "score_index" in batch
  k, length = batch["score_index"].shape[1], batch["tokens"].shape[1]
  assert k < length
  full = {key: v for key, v in batch.items() if key != "score_index"}
  view = logprobs.scoring_view(batch)   # [R, K] position keys; no misaligned [R, L] ones
  assert view["tokens"].shape == view["source"].shape == batch["score_index"].shape
  assert "positions" not in view and "segment_ids" not in view and "valid" in view
  params = core.init_params(CFG, 0)
  teacher_cfg = CFG.replace(hidden_size=48, num_heads=4, num_kv_heads=4)
  teacher_params = core.init_params(teacher_cfg, 1)
  graphdef, te_graphdef = core.split(CFG)[0], core.split(teacher_cfg)[0]

  def f(p, b):
    te = core.merge(te_graphdef, teacher_params)
    te_hidden, _ = te(b["tokens"], b["positions"], b["segment_ids"])
    out = logprobs.sequence_logps(core.merge(graphdef, p), b, chunk=16, tokens=True,
                                  stats=("logsumsq", "entropy"),
                                  teacher=(te_hidden, te.unembedding()))
    # a loss that reads sums and per-token values, so the gradient passes through both
    loss = jnp.sum(out["logps"]) + 0.1 * jnp.sum(out["tokens/logp"] ** 2) + jnp.sum(
        out["teacher_kl"]) + jnp.sum(out["entropy"])
    return loss, out

  vg = jax.jit(jax.value_and_grad(f, has_aux=True), compiler_options=FAST_COMPILE)
  (loss_s, out_s), g_s = vg(params, batch)
  (loss_f, out_f), g_f = vg(params, full)
  assert set(out_s) == set(out_f)
  for key in out_f:
    assert out_s[key].shape == out_f[key].shape, key
    np.testing.assert_allclose(out_s[key], out_f[key], rtol=1e-5, atol=1e-5, err_msg=key)
  assert float(jnp.sum(out_f["lens"])) == float(jnp.sum(batch["loss_mask"]))
  np.testing.assert_allclose(loss_s, loss_f, rtol=1e-6)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_f))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale),
               g_s, g_f)


def test_scoring_fewer_positions_costs_fewer_flops(capsys):
  """The compiled forward+backward does the unembedding on K of L positions: XLA's own FLOP
  count drops by about (L − K) / L of the unembedding's share."""
  cfg = CFG.replace(vocab_size=4096, num_layers=1)
  ex = examples(8)
  batch = jax.tree.map(jnp.asarray, preference.collate(ex, (64,), PAD))
  full = {key: v for key, v in batch.items() if key != "score_index"}
  params = core.init_params(cfg, 0)
  graphdef = core.split(cfg)[0]

  def loss(p, b):
    return jnp.sum(logprobs.sequence_logps(core.merge(graphdef, p), b, chunk=64)["logps"])

  def cost(b):
    c = jax.jit(jax.grad(loss)).lower(params, b).compile().cost_analysis()
    return float((c[0] if isinstance(c, list) else c)["flops"])
  k, length = batch["score_index"].shape[1], batch["tokens"].shape[1]
  rows, d, v = batch["tokens"].shape[0], cfg.hidden_size, cfg.vocab_size
  # forward + two backward matmuls of the unembedding on the positions not scored
  saved_unembed = 3 * 2 * rows * (length - k) * d * v
  f_full, f_scored = cost(full), cost(batch)
  with capsys.disabled():
    print(f"\n[scoring] K={k} of L={length}: {f_full / 1e9:.3f} -> {f_scored / 1e9:.3f} GFLOP "
          f"(unembedding on unscored positions: {saved_unembed / 1e9:.3f})")
  assert f_full - f_scored >= 0.9 * saved_unembed


@pytest.mark.parametrize("bad", [-1, True])
def test_bad_score_parts_names_the_key(bad):
  from dpo_jax import build
  from helpers import config
  with pytest.raises(ValueError, match=r"config\.data\.score_parts="):
    build.setup(config(data__score_parts=bad))
