"""Chunked per-token log-probs against the naive full-logits computation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.models import logprobs


def naive(hidden, w, tokens):
  logits = np.einsum("bld,dv->blv", np.float64(hidden), np.float64(w))
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  out = np.zeros(tokens.shape)
  out[:, 1:] = np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
  p = np.exp(logp)
  lsq = np.zeros(tokens.shape)
  lsq[:, 1:] = np.log((p[:, :-1] ** 2).sum(-1))
  ent = np.zeros(tokens.shape)
  ent[:, 1:] = -(p[:, :-1] * logp[:, :-1]).sum(-1)
  mean = np.zeros(tokens.shape)
  mean[:, 1:] = logits[:, :-1].mean(-1)
  return out, lsq, ent, mean


@pytest.mark.parametrize("chunk", [1, 4, 5, 16, 64])
def test_token_stats_match_naive(chunk):
  rng = np.random.default_rng(0)
  b, length, d, v = 3, 16, 8, 37
  hidden = rng.normal(size=(b, length, d)).astype(np.float32)
  w = rng.normal(size=(d, v)).astype(np.float32) * 3
  tokens = rng.integers(0, v, size=(b, length))
  out = logprobs.token_stats(jnp.asarray(hidden), jnp.asarray(w), jnp.asarray(tokens),
                             chunk=chunk, stats=("logsumsq", "entropy"))
  ref_logp, ref_lsq, ref_ent, ref_mean = naive(hidden, w, tokens)
  np.testing.assert_allclose(out["logp"], ref_logp, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(out["logsumsq"], ref_lsq, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(out["entropy"], ref_ent, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(out["logit_mean"], ref_mean, atol=2e-5, rtol=1e-5)


def test_chunked_gradient_matches_full_logits():
  rng = np.random.default_rng(1)
  b, length, d, v = 2, 12, 8, 29
  hidden = jnp.asarray(rng.normal(size=(b, length, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, v, size=(b, length)))
  mask = jnp.asarray(rng.integers(0, 2, size=(b, length)), jnp.float32)

  def chunked(h, w):
    return jnp.sum(logprobs.token_stats(h, w, tokens, chunk=5)["logp"] * mask)

  def full(h, w):
    logp = jax.nn.log_softmax(jnp.einsum("bld,dv->blv", h, w), -1)
    tok = jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    return jnp.sum(tok * mask[:, 1:])

  g1 = jax.grad(chunked, argnums=(0, 1))(hidden, w)
  g2 = jax.grad(full, argnums=(0, 1))(hidden, w)
  for a, b_ in zip(g1, g2):
    np.testing.assert_allclose(a, b_, atol=1e-5, rtol=1e-5)


def test_chunks_bound_the_logits_in_memory():
  """Full [B, L, V] f32 logits never exist: the compiled forward+backward of chunked log-probs
  needs a fraction of them in temporaries, where one chunk of all L positions needs them whole
  (XLA's memory analysis; the shape makes the logits dominate)."""
  b, length, d, v = 4, 256, 64, 8192
  logits_bytes = b * length * v * 4   # 32 MiB
  hidden = jax.ShapeDtypeStruct((b, length, d), jnp.float32)
  w = jax.ShapeDtypeStruct((d, v), jnp.float32)
  tokens = jax.ShapeDtypeStruct((b, length), jnp.int32)

  def temp_bytes(chunk):
    def f(h, w, t):
      return jnp.sum(logprobs.token_stats(h, w, t, chunk=chunk)["logp"])
    grad = jax.jit(jax.grad(f, argnums=(0, 1)))
    return grad.lower(hidden, w, tokens).compile().memory_analysis().temp_size_in_bytes
  whole, chunked = temp_bytes(length), temp_bytes(16)
  assert whole >= logits_bytes, (whole, logits_bytes)
  assert chunked < logits_bytes / 4, (chunked, logits_bytes)


def test_left_align_and_reduce_packed_layout():
  # Two rows; row 0 packs sequences 0 and 2, row 1 holds sequence 1 and 3 packed.
  tokens = jnp.zeros((2, 8), jnp.int32)
  values = jnp.arange(16, dtype=jnp.float32).reshape(2, 8) + 1
  loss_mask = jnp.array([[0, 1, 1, 0, 0, 1, 0, 0], [0, 0, 1, 1, 1, 0, 1, 1]], jnp.float32)
  seq_index = jnp.array([[0, 0, 0, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 3, 3, 3]])
  batch = {"tokens": tokens, "loss_mask": loss_mask, "seq_index": seq_index,
           "valid": jnp.ones(2)}
  aligned = logprobs.left_align(values, batch)
  expected = np.zeros((4, 8))
  expected[0, :2] = [2, 3]
  expected[1, :3] = [11, 12, 13]
  expected[2, :1] = [6]
  expected[3, :2] = [15, 16]
  np.testing.assert_array_equal(aligned, expected)
  red = logprobs.reduce_sequences({"logp": values, "logit_mean": values}, batch)
  np.testing.assert_array_equal(red["logps"], expected.sum(1))
  np.testing.assert_array_equal(red["lens"], [2, 3, 1, 2])


@pytest.mark.parametrize("v_te", [23, 29, 19])
def test_teacher_kl_matches_numpy(v_te):
  """KL(p_te ‖ p) per position; with another vocabulary size (a padded embedding) p_te is the
  teacher's distribution on the shared ids, renormalised, and p the student's whole one."""
  rng = np.random.default_rng(3)
  b, length, d, d_te, v = 2, 10, 8, 12, 23
  h = rng.normal(size=(b, length, d)).astype(np.float32)
  w = rng.normal(size=(d, v)).astype(np.float32)
  h_te = rng.normal(size=(b, length, d_te)).astype(np.float32)
  w_te = rng.normal(size=(d_te, v_te)).astype(np.float32)
  tokens = rng.integers(0, v, size=(b, length))
  out = logprobs.token_stats(jnp.asarray(h), jnp.asarray(w), jnp.asarray(tokens), chunk=3,
                             teacher=(jnp.asarray(h_te), jnp.asarray(w_te)))

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  shared = min(v, v_te)
  lp = log_softmax(np.einsum("bld,dv->blv", np.float64(h), np.float64(w)))[..., :shared]
  lt = log_softmax(np.einsum("bld,dv->blv", np.float64(h_te), np.float64(w_te))[..., :shared])
  kl = np.zeros((b, length))
  kl[:, 1:] = (np.exp(lt) * (lt - lp)).sum(-1)[:, :-1]
  np.testing.assert_allclose(out["teacher_kl"], kl, rtol=1e-5, atol=1e-5)
  # The gradient flows to the student only.
  g = jax.grad(lambda h, h_te: logprobs.token_stats(
      h, jnp.asarray(w), jnp.asarray(tokens), chunk=4,
      teacher=(h_te, jnp.asarray(w_te)))["teacher_kl"].sum(), argnums=(0, 1))(
          jnp.asarray(h), jnp.asarray(h_te))
  assert float(jnp.abs(g[0]).sum()) > 0 and float(jnp.abs(g[1]).sum()) == 0
