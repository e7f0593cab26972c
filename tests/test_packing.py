"""Packing (dpo_jax/data/packing.py): layout, equality of losses and gradients with the unpacked
step, gradient accumulation, and the padding removed on a realistic length distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import build, train
from dpo_jax.data import packing, preference
from dpo_jax.data.preference import Tokenized
from dpo_jax.models import core, layers, logprobs
from helpers import config, unpaired_rows

PAD = 0


def random_examples(n, seed, paired=True, max_prompt=40, max_completion=60):
  rng = np.random.default_rng(seed)
  tok = lambda m: list(rng.integers(1, 256, int(rng.integers(1, m + 1))))
  return [Tokenized(tok(max_prompt), tok(max_completion), tok(max_completion) if paired else None,
                    float(rng.integers(0, 2)) if not paired else 1.0) for _ in range(n)]


def extract(batch, s):
  """(tokens, loss_mask, row) of sequence s in a packed batch; checks it is one contiguous
  segment with positions 0..n-1."""
  where = (batch["seq_index"] == s) & (batch["segment_ids"] > 0)
  rows = np.flatnonzero(where.any(1))
  assert len(rows) == 1, f"sequence {s} is in rows {rows}"
  r = rows[0]
  cols = np.flatnonzero(where[r])
  assert np.array_equal(cols, np.arange(cols[0], cols[0] + len(cols))), "not contiguous"
  seg = batch["segment_ids"][r, cols]
  assert (seg == seg[0]).all()
  assert ((batch["segment_ids"][r] == seg[0]) == where[r]).all(), "segment id reused in row"
  np.testing.assert_array_equal(batch["positions"][r, cols], np.arange(len(cols)))
  return batch["tokens"][r, cols], batch["loss_mask"][r, cols], r


def check_layout(batch, ref, row_length, row_buckets):
  """Every sequence of the unpacked `ref` (collate) appears once, identical, in `batch`."""
  r, length = batch["tokens"].shape
  assert length == row_length and r in row_buckets
  n_seq = ref["tokens"].shape[0]
  covered = np.zeros_like(batch["segment_ids"], bool)
  for s in range(n_seq):
    tokens, mask, _ = extract(batch, s)
    n = int(ref["segment_ids"][s].sum())
    np.testing.assert_array_equal(tokens, ref["tokens"][s, :n])
    np.testing.assert_array_equal(mask, ref["loss_mask"][s, :n])
    covered |= (batch["seq_index"] == s) & (batch["segment_ids"] > 0)
  assert covered.sum() == ref["segment_ids"].sum()
  pad = batch["segment_ids"] == 0
  assert (pad == ~covered).all()
  assert (batch["tokens"][pad] == PAD).all() and (batch["loss_mask"][pad] == 0).all()
  assert (batch["seq_index"][pad] == 0).all() and (batch["positions"][pad] == 0).all()
  for row in batch["segment_ids"]:   # segments 1, 2, ... in order, padding only at the end
    used = row[row > 0]
    assert (np.diff(used) >= 0).all() and (row[len(used):] == 0).all()
    assert np.array_equal(np.unique(used), np.arange(1, len(np.unique(used)) + 1))
  np.testing.assert_array_equal(batch["valid"], ref["valid"])
  np.testing.assert_array_equal(batch["label"], ref["label"])


@pytest.mark.parametrize("paired", [True, False])
def test_pack_layout_matches_collate(paired):
  ex = random_examples(16, seed=1 if paired else 2, paired=paired)
  buckets = preference.default_buckets(128)
  ref = preference.collate(ex, buckets, PAD, valid=[True] * 15 + [False])
  for row_length, row_buckets in ((128, None), (256, (4, 8, 16, 32)), (100, (32,))):
    batch = packing.pack(ex, row_length=row_length, row_buckets=row_buckets, pad_id=PAD,
                         valid=[True] * 15 + [False], max_length=max(buckets))
    check_layout(batch, ref, row_length, row_buckets or packing.default_row_buckets(32))
    assert set(batch) - {"score_index"} == set(ref) - {"score_index"}   # K is per layout
    if row_buckets is None:
      assert batch["tokens"].shape[0] < ref["tokens"].shape[0]   # fewer rows than sequences
      assert packing.padding_fraction(batch) < packing.padding_fraction(ref)
    # Attention: token q sees token kv iff both belong to the same sequence and kv is not after
    # q in it, i.e. exactly the unpacked row's mask of that sequence.
    m = np.asarray(layers.attention_mask(batch["positions"], batch["segment_ids"],
                                         batch["positions"], batch["segment_ids"], None))
    seq = np.where(batch["segment_ids"] > 0, batch["seq_index"], -1)
    same = (seq[:, :, None] == seq[:, None, :]) & (seq[:, None, :] >= 0)
    causal = batch["positions"][:, :, None] >= batch["positions"][:, None, :]
    np.testing.assert_array_equal(m, same & causal)


@pytest.mark.parametrize("paired", [True, False])
def test_share_prompt_layout(paired):
  """[prompt | chosen | rejected] rows: each sequence of collate's batch is its prompt plus its
  completion, positions run on from the prompt in both branches, a token sees exactly the
  tokens of its own sequence before it, and each scored token is predicted by the hidden state
  of the token before it in its sequence (the last prompt token for both first tokens)."""
  ex = random_examples(12, seed=6 if paired else 7, paired=paired)
  buckets = preference.default_buckets(128)
  ref = preference.collate(ex, buckets, PAD)
  b = len(ex)
  batch = packing.pack(ex, row_length=256, pad_id=PAD, max_length=max(buckets),
                       share_prompt=True)
  assert set(batch) - {"score_index"} == set(ref) - {"score_index"} | {"source"}
  assert batch["tokens"].shape[0] in packing.default_row_buckets(b)
  seg, loss_mask = batch["segment_ids"], batch["loss_mask"]
  assert (seg % layers.BRANCH).max() >= 2   # several pairs in a row
  m = np.asarray(layers.attention_mask(batch["positions"], seg, batch["positions"], seg, None))
  covered = np.zeros_like(seg, bool)
  for s in range(2 * b):
    i = s % b
    prompt = (batch["seq_index"] == i) & (seg > 0) & (loss_mask == 0)
    completion = (batch["seq_index"] == s) & (loss_mask > 0)
    rows = np.flatnonzero((prompt | completion).any(1))
    assert len(rows) == 1, f"sequence {s} is in rows {rows}"
    r = rows[0]
    view = np.concatenate([np.flatnonzero(prompt[r]), np.flatnonzero(completion[r])])
    n = int(ref["segment_ids"][s].sum())
    assert len(view) == n
    np.testing.assert_array_equal(batch["tokens"][r, view], ref["tokens"][s, :n])
    np.testing.assert_array_equal(loss_mask[r, view], ref["loss_mask"][s, :n])
    np.testing.assert_array_equal(batch["positions"][r, view], np.arange(n))
    for j, q in enumerate(view):
      visible = np.flatnonzero(m[r, q])
      np.testing.assert_array_equal(visible, np.sort(view[:j + 1]), err_msg=f"seq {s} tok {j}")
      if loss_mask[r, q]:
        assert batch["source"][r, q] == view[j - 1], (s, j)
    covered[r, view] = True
  assert (covered == (seg > 0)).all()
  pad = seg == 0
  assert (batch["tokens"][pad] == PAD).all() and (loss_mask[pad] == 0).all()
  # Fewer token slots than one row per sequence: every prompt is there once.
  assert (seg > 0).sum() == sum(len(e.prompt) for e in ex) + (ref["loss_mask"] > 0).sum()
  with pytest.raises(ValueError, match=r"example 1 of the batch has 9 tokens with its prompt "
                                       r"shared \(3 prompt \+ 3 chosen \+ 3 rejected\), more "
                                       r"than row_length=8"):
    packing.pack([Tokenized([1], [2], [3]), Tokenized([1] * 3, [2] * 3, [3] * 3)],
                 row_length=8, pad_id=PAD, share_prompt=True)
  with pytest.raises(ValueError, match=r"example 5 has \d+ tokens with its prompt shared"):
    long = list(ex)
    long[5] = Tokenized([1] * 60, [2] * 68, [3] * 68 if paired else None, 1.0)   # 196 tokens
    packing.PackedBatches(long, 4, 0, buckets, PAD, row_length=190, share_prompt=True)


def test_pack_errors_and_buckets():
  ex = random_examples(4, seed=3)
  ex[2] = Tokenized([1] * 30, [2] * 60, [3] * 90)
  with pytest.raises(ValueError, match=r"sequence 6 \(example 2 of the batch, rejected\) has "
                                       r"120 tokens, more than row_length=100"):
    packing.pack(ex, row_length=100, row_buckets=None, pad_id=PAD)
  with pytest.raises(ValueError, match="more than the largest row bucket"):
    packing.pack(ex, row_length=128, row_buckets=(1,), pad_id=PAD)
  with pytest.raises(ValueError, match="empty prompt"):
    packing.pack([Tokenized([], [1], [2])], row_length=16, pad_id=PAD)
  assert packing.default_row_buckets(128)[:12] == (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16)
  assert packing.default_row_buckets(16, 8) == (8, 16)
  assert packing.default_row_buckets(20, 8) == (8, 16, 24)
  assert packing.power_of_two_row_buckets(128) == (1, 2, 4, 8, 16, 32, 64, 128)
  batch = packing.pack(ex, row_length=256, pad_id=PAD, row_multiple=4)
  assert batch["tokens"].shape[0] == 4   # 2 rows needed, rounded up for 4 devices


@pytest.mark.parametrize("paired", [True, False])
def test_pack_microbatches_matches_train_microbatches(paired):
  ex = random_examples(12, seed=4, paired=paired)
  buckets = preference.default_buckets(128)
  k, b = 3, 4
  ref = preference.add_columns(preference.collate(ex, buckets, PAD), {
      "ref_logps": np.arange(24.0).reshape(12, 2)}, list(range(12)))
  ref_mb = train.microbatches(ref, k)
  cols = {"ref_logps": ref["ref_logps"]}
  out = packing.pack_microbatches(ex, k, row_length=128, pad_id=PAD, max_length=128,
                                  columns=cols)
  assert out["tokens"].shape[:2] == ref_mb["valid"].shape[:1] + out["tokens"].shape[1:2]
  for j in range(k):
    mb = {name: x[j] for name, x in out.items()}
    unpacked = {name: x[j] for name, x in ref_mb.items()}
    # train.microbatches' rows of micro-batch j are its 2b sequences, seq_index 0..2b-1
    np.testing.assert_array_equal(unpacked["seq_index"][:, 0], np.arange(2 * b))
    check_layout(mb, unpacked, 128, packing.default_row_buckets(2 * b))
    np.testing.assert_array_equal(mb["ref_logps"], unpacked["ref_logps"])


def test_packed_batches_follow_the_batches_stream():
  ex = random_examples(40, seed=5)
  buckets = preference.default_buckets(128)
  cols = {"ref_logps": np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)}
  plain = preference.Batches(ex, 8, 7, buckets, PAD, columns=cols)
  packed = packing.PackedBatches(ex, 8, 7, buckets, PAD, columns=cols, row_length=128)
  for step in (0, 4, 5, 11):   # 5 batches per epoch: 4 and 5 straddle nothing, 11 is epoch 2
    assert packed.indices(step) == plain.indices(step)
    assert packed.epoch(step) == plain.epoch(step)
    a, p = plain(step), packed(step)
    check_layout(p, a, 128, packing.default_row_buckets(16))
    np.testing.assert_array_equal(p["ref_logps"], a["ref_logps"])
    mb = packed.microbatches(step, 2)
    np.testing.assert_array_equal(mb["ref_logps"], train.microbatches(a, 2)["ref_logps"])
  with pytest.raises(ValueError, match="row_length"):
    packing.PackedBatches(ex, 8, 7, buckets, PAD, row_length=64)


# ---------------------------------------------------------------------------------------------
# Losses and gradients: the real step on packed and unpacked batches from the same state.
# ---------------------------------------------------------------------------------------------

# As in test_train.py: a larger Adam eps bounds how much f32 reduction-order noise in near-zero
# gradients can move the parameters (Adam's first update is ≈ lr·sign(g)). One length bucket and
# one row bucket, so that the two steps of a case reuse one compiled program.
SMALL = dict(batch_size=8, optim__lr=1e-3, optim__eps=1e-6, optim__warmup_ratio=0.0,
             data__eval_fraction=0.0, data__buckets=(128,), model__num_layers=1,
             model__hidden_size=32, model__intermediate_size=64, model__remat="none",
             logprob_chunk=128)
TOL = dict(rtol=1e-5, atol=1e-5)
# LLVM -O0 for the CPU code: halves compile time; both layouts are compiled the same way.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def unpaired_jsonl(tmp_path_factory):
  return unpaired_rows(tmp_path_factory.mktemp("unpaired") / "rows.jsonl")


def direct_grads(run, loss_state):
  """value_and_grad of Σ valid · loss over one micro-batch, with the per-sequence log-probs
  (the step's forward, rebuilt from the public pieces), on two batches in one program."""
  spec = run.spec
  hparams = build.loss_hparams(run.config.loss, spec)
  graphdef = core.split(run.model_cfg)[0]
  stats = train.side_stats(spec, train.POLICY_STATS)

  def f(params, batch):
    pol = logprobs.sequence_logps(core.merge(graphdef, params), batch,
                                  chunk=run.config.logprob_chunk, stats=stats,
                                  tokens=spec.needs_tokens)
    ref = run.reference.logps_fn(run.ref_params, batch)
    loss_b, _ = spec(train.pair_logps(spec, pol, ref, batch, run.model_cfg.vocab_size),
                     **hparams, **loss_state)
    return jnp.sum(loss_b * batch["valid"]), pol
  vg = jax.value_and_grad(f, has_aux=True)
  return jax.jit(lambda params, a, b: (vg(params, a), vg(params, b)),
                 compiler_options=FAST_COMPILE)


def max_dev(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# Every case on 8 devices: rows and pairs sharded 4 ways (so R is a multiple of 4), weights 2
# ways (one mesh for all cases: setup's param init compiles once).
MESH = {"mesh__data": 4, "mesh__tensor": 2}
CASES = {   # name: (loss, grad_accum, row bucket, overrides)
    "dpo_accum2": ("dpo", 2, 4, {}),   # 2 micro-batches of 4 pairs
    # per-token fields (policy tokens/logp and tokens/logsumsq, left-aligned) and the gradient
    "wpo_tokens": ("wpo(dpo)", 1, 8, {}),
    # unpaired: the mismatched completions are formed over the whole batch, then split
    "kto_accum2": ("kto", 2, 4, {"unpaired": True}),
    # prompt sharing: rows [prompt | chosen | rejected], several pairs per row
    "wpo_shared_tokens": ("wpo(dpo)", 1, 4, {"share": True}),
    "kto_shared_accum2": ("kto", 2, 4, {"unpaired": True, "share": True}),
    # batch-coupled paired losses through the whole-batch path: AOT's global sort, BCO's δ
    "aot_accum2": ("aot", 2, 4, {}),
    "bco_pair_shared_accum2": ("bco_pair", 2, 4, {"share": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_packed_step_equals_unpacked(case, unpaired_jsonl, capsys):
  loss, k, n_rows, extra = CASES[case]
  extra = dict(extra)
  if extra.pop("unpaired", False):
    extra["data__train"] = unpaired_jsonl
  share = extra.pop("share", False)
  row_length = 256 if share else 128
  cfg = config(f"configs/dpo.py:runlocal,loss={loss}", **SMALL, **MESH, grad_accum=k, **extra)
  run = build.setup(cfg)
  data = run.train_data
  n_batch = run.mesh.shape["data"] * run.mesh.shape["fsdp"]
  packed_data = packing.PackedBatches(data.examples, cfg.batch_size, cfg.seed, data.buckets,
                                      data.pad_id, columns=data.columns, row_length=row_length,
                                      row_buckets=(n_rows,), row_multiple=n_batch,
                                      share_prompt=share)
  # The step on both layouts in one program (one compile), with run.jit_train_step's fixed
  # state shardings and donation.
  sh, fn = run.state_shardings, run.fns.train_step
  step = jax.jit(lambda su, sp, ref, bu, bp: (fn(su, ref, bu), fn(sp, ref, bp)),
                 in_shardings=(sh, sh, None, None, None),
                 out_shardings=((sh, None), (sh, None)), donate_argnums=(0, 1),
                 compiler_options=FAST_COMPILE)
  init = jax.device_get(run.state)
  state_u, state_p = run.state, jax.tree.map(lambda x: x.copy(), run.state)
  devs, shapes = {}, set()
  for i in range(2):   # step 0: ref = policy; step 1: nonzero rewards
    bu = train.microbatches(data(i), k)
    bp = packed_data.microbatches(i, k)
    shapes.add(tuple(sorted((name, x.shape) for b_ in (bu, bp) for name, x in b_.items())))
    assert bp["tokens"].shape == (k, n_rows, row_length) and bp["valid"].shape == (k, 8 // k)
    # rows really hold several sequences (pairs when shared)
    assert (bp["segment_ids"] % layers.BRANCH).max() >= (2 if share else 3)
    assert ("source" in bp) == share
    if share:   # the prompts are computed once: fewer real tokens than the unshared layout
      assert (bp["segment_ids"] > 0).sum() < (bu["segment_ids"] > 0).sum()
    else:
      assert bp["tokens"].size < bu["tokens"].size
    (state_u, mu), (state_p, mp) = step(state_u, state_p, run.frozen,
                                        build.to_device(bu, run), build.to_device(bp, run))
    mu, mp = jax.device_get(mu), jax.device_get(mp)
    assert set(mu) == set(mp)
    for key in mu:
      np.testing.assert_allclose(mp[key], mu[key], **TOL, err_msg=f"step {i}: {key}")
    devs[f"metrics[{i}]"] = max(abs(float(mp[key]) - float(mu[key])) for key in mu)
    for key in ("loss", "grad_norm", "logps/chosen", "logits/chosen"):
      assert key in mu
    assert float(mu["logps/chosen"]) != 0.0
  assert step._cache_size() == len(shapes)   # one compile per batch shape (score_index's K)
  pu, pp = jax.device_get(state_u["params"]), jax.device_get(state_p["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), pu, pp)
  devs["params"] = max_dev(pu, pp)
  if k == 1:   # the gradient itself, and every per-sequence value, before any optimizer
    ((lu, pol_u), gu), ((lp, pol_p), gp) = direct_grads(run, init["loss_state"])(
        init["params"], data(0), packed_data(0))
    np.testing.assert_allclose(lp, lu, rtol=1e-6)
    for key in pol_u:
      x, y = np.asarray(pol_u[key]), np.asarray(pol_p[key])
      if key.startswith("tokens/"):   # [2B, L]: unpacked L is the bucket, packed row_length
        assert not y[:, x.shape[1]:].any()
        y = y[:, :x.shape[1]]
      np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5, err_msg=key)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-7), gu, gp)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(gu))
    devs["grads (max |Δg| / max |g|)"] = max_dev(gu, gp) / scale
    devs["loss_sum"] = abs(float(lp) - float(lu))
  with capsys.disabled():
    print(f"\n[{case}] max |packed − unpacked|: "
          + ", ".join(f"{k_}={v:.1e}" for k_, v in devs.items()))


def test_share_prompt_trains_from_config(tmp_path):
  """config.data.share_prompt=True through setup and the training loop: packed [prompt | chosen
  | rejected] rows of 2·max_length, the step's own compiled program, metrics written."""
  import json   # noqa: PLC0415
  cfg = config("configs/dpo.py:runlocal", **SMALL, steps=3, eval_every=0, ckpt_every=0,
               progress=False, log_every=1,
               data__share_prompt=True)
  run = build.setup(cfg)
  assert isinstance(run.train_data, packing.PackedBatches) and run.train_data.share_prompt
  assert run.train_data.row_length == 2 * 128
  train.train_and_evaluate(cfg, str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  train_rows = [r for r in rows if "loss" in r and r.get("step", 0) >= 1]
  assert len(train_rows) >= 1 and all(np.isfinite(r["loss"]) for r in train_rows)
  assert all(r["rewards/accuracies"] >= 0 for r in train_rows)


def test_row_buckets_that_a_later_step_could_outgrow_fail_at_setup():
  """A largest row bucket below the rows of the worst micro-batch (one per sequence, one per
  pair when prompts are shared), or a bucket that does not shard over data×fsdp, fails at setup
  naming config.data.row_buckets, not at the step that draws a long batch (after checkpoints,
  and again on resume). Buckets that hold any batch pass."""
  base = dict(SMALL, data__packing=True, data__buckets=(128,))
  with pytest.raises(ValueError, match=r"config.data.row_buckets=\(8,\): a micro-batch of 8 "
                     r"pairs needs up to 16 rows \(one per sequence when none share a row\); add "
                     r"a bucket of at least 16"):
    build.setup(config("configs/dpo.py:runlocal", **base, data__row_buckets=(8,)))
  with pytest.raises(ValueError, match=r"a micro-batch of 4 pairs needs up to 4 rows \(one per "
                     r"pair when none share a row\); add a bucket of at least 4"):
    build.setup(config("configs/dpo.py:runlocal", **base, data__share_prompt=True, grad_accum=2,
                       data__row_buckets=(2,)), devices=jax.devices()[:1])
  with pytest.raises(ValueError, match=r"row_buckets=\(8, 12\): \[12\] are not multiples of "
                     r"the 8 data×fsdp devices"):
    build.setup(config("configs/dpo.py:runlocal", **base, data__row_buckets=(8, 12)))
  data = build.setup(config("configs/dpo.py:runlocal", **base, data__row_buckets=(8, 16)),
                     devices=jax.devices()[:1]).train_data
  assert data.row_multiple == 1 and data.row_buckets == (8, 16)
  for step in range(4):   # every batch fits the buckets
    assert data.microbatches(step, 1)["tokens"].shape[1] in (8, 16)


def test_share_prompt_with_precomputed_reference(tmp_path):
  """Precomputed reference log-probs are per-sequence columns: on shared-prompt rows they reach
  the loss unchanged, and the per-example metrics equal one row per sequence."""
  cfg = config("configs/dpo.py:runlocal", **SMALL, reference__mode="precomputed")
  run = build.setup(cfg, workdir=str(tmp_path))
  data = run.train_data
  assert "ref_logps" in data.columns
  shared = packing.PackedBatches(data.examples, cfg.batch_size, cfg.seed, data.buckets,
                                 data.pad_id, columns=data.columns, row_length=256,
                                 share_prompt=True)
  metrics = jax.jit(run.fns.example_metrics, compiler_options=FAST_COMPILE)
  # A policy away from the reference, so that margins (and accuracies) are not float noise.
  leaves, tree = jax.tree.flatten(run.state["params"])
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])
  out = [jax.device_get(metrics(params, run.state["loss_state"], run.frozen,
                                jax.tree.map(jnp.asarray, b))) for b in (data(1), shared(1))]
  assert np.abs(out[0]["rewards/margins"]).min() > 1e-3, out[0]["rewards/margins"]
  np.testing.assert_array_equal(shared(1)["ref_logps"], data(1)["ref_logps"])
  for k in out[0]:
    np.testing.assert_allclose(out[1][k], out[0][k], rtol=1e-5, atol=1e-5, err_msg=k)


# ---------------------------------------------------------------------------------------------
# Padding removed on a realistic length distribution
# ---------------------------------------------------------------------------------------------


def test_padding_removed_on_realistic_lengths(capsys):
  lengths = packing.realistic_lengths(64 * 100, seed=0)
  buckets = preference.default_buckets(1024)
  reports = {}
  for row_length in (1024, 2048):
    rep = packing.padding_report(lengths, 64, buckets, row_length)
    reports[row_length] = rep
    assert rep["removed"] > 0.3 and rep["packed"] < rep["unpacked"]
    assert len(rep["row_buckets_hit"]) <= 5
  with capsys.disabled():
    base = reports[1024]
    print(f"\nbucketed unpacked: padding {base['unpacked_pad_fraction']:.3f} of "
          f"{base['unpacked'] // base['batches']} token slots per batch of 64 pairs")
    for row_length, rep in reports.items():
      print(f"packed rows of {row_length}: padding {rep['packed_pad_fraction']:.3f} of "
            f"{rep['packed'] // rep['batches']} slots; padding removed {rep['removed']:.3f} "
            f"({rep['removed_exact']:.3f} without row buckets); row buckets hit "
            f"{rep['row_buckets_hit']}")
  # padding_fraction of real batches agrees with the report's accounting.
  rng = np.random.default_rng(1)
  ex, lens = [], lengths[:64]
  for c, r in lens:
    p = int(rng.integers(1, min(c, r)))
    ex.append(Tokenized([1] * p, [2] * (int(c) - p), [3] * (int(r) - p)))
  rep = packing.padding_report(lens, 64, buckets, 1024)
  unpacked = preference.collate(ex, buckets, PAD)
  packed = packing.pack(ex, row_length=1024, pad_id=PAD)
  assert packing.padding_fraction(unpacked) == pytest.approx(rep["unpacked_pad_fraction"])
  assert packing.padding_fraction(packed) == pytest.approx(rep["packed_pad_fraction"])
