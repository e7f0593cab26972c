"""daDPO: the teacher's log-probs and token distributions enter the loss inside the step."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import build, evaluate, losses, reference, train
from dpo_jax.models import core, hf_io
from helpers import config, setup_holding

SMALL = dict(data__max_length=64, data__max_prompt_length=40, data__eval_fraction=0.0,
             optim__lr=1e-2, optim__warmup_ratio=0.0, eval_every=0, batch_size=8)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A teacher with another architecture than the student (wider, deeper), same vocabulary."""
  from dpo_jax.data.tokenizer import byte_tokenizer
  from dpo_jax.models import TINY, init_params
  cfg = TINY.replace(hidden_size=96, intermediate_size=256, num_layers=3, num_heads=6,
                     num_kv_heads=3)
  path = tmp_path_factory.mktemp("teacher") / "hf"
  hf_io.save_hf(str(path), cfg, init_params(cfg, 7), tokenizer=byte_tokenizer())
  return str(path), cfg


def first_step(cfg, params=None):
  """(run, first batch, per-example metrics of it) with the initial policy, or with `params`
  against the same reference and teacher."""
  run = build.setup(cfg)
  batch_np = run.train_data(0)
  batch = build.to_device(train.microbatches(batch_np, 1), run)
  per_example = jax.jit(run.fns.example_metrics)(
      run.state["params"] if params is None else params(run.state["params"]),
      run.state["loss_state"], run.frozen, jax.tree.map(lambda x: x[0], batch))
  return run, batch_np, jax.device_get(per_example)


def perturbed(params, scale=0.05):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                   for x, k in zip(leaves, keys)])


def test_dadpo_token_loss_matches_numpy():
  rng = np.random.default_rng(0)
  b = 16
  pc, pr, rc, rr = (rng.normal(-40, 10, b) for _ in range(4))
  lc, lr = rng.integers(1, 30, b), rng.integers(1, 30, b)
  kc, kr = rng.uniform(0, 20, b), rng.uniform(0, 20, b)
  logps = losses.PairLogps(pc, pr, rc, rr, lc, lr,
                           extra={"teacher_kl_chosen": kc, "teacher_kl_rejected": kr})
  for kl_on, kl in (("both", (kc + kr) / (lc + lr)), ("chosen", kc / lc)):
    loss, m = losses.get("dadpo_token")(logps, beta=0.2, beta2=0.3, kl_on=kl_on)
    h = 0.2 * ((pc - rc) - (pr - rr))
    np.testing.assert_allclose(loss, np.logaddexp(0, -h) + 0.3 * kl, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m["teacher_kl"], kl, rtol=1e-5)


def check_sequence_dadpo(path, te_cfg):
  """Sequence-level daDPO with a policy moved away from its reference (so that β1's term is
  live) against each model's scores from the scoring path:
  z = (β1 + β2) Δ_θ − β1 Δ_ref − β2 Δ_te, Δ = chosen − rejected log-probs."""
  cfg = config("configs/dpo.py:runlocal,loss=dadpo", **SMALL, loss__beta=0.3,
               loss__beta2=0.5, teacher__mode="step", teacher__path=path)
  run, batch_np, ex = first_step(cfg, perturbed)
  examples = [run.train_data.examples[i] for i in run.train_data.indices(0)]
  kw = dict(mesh=run.mesh, rules=run.rules, batch_size=8, buckets=run.train_data.buckets,
            pad_id=run.train_data.pad_id)
  delta = lambda s: s["chosen_logps"] - s["rejected_logps"]
  pol, ref, te = (delta(evaluate.score_pairs(c, p, examples, **kw)) for c, p in (
      (run.model_cfg, perturbed(run.state["params"])), (run.model_cfg, run.ref_params),
      (te_cfg, run.teacher.params)))
  z = 0.8 * pol - 0.3 * ref - 0.5 * te
  np.testing.assert_allclose(ex["loss"], np.logaddexp(0, -z), rtol=1e-4, atol=1e-5)
  assert np.abs(0.3 * (pol - ref)).max() > 0.05   # β1's term: the policy moved
  assert np.abs(0.5 * (pol - te)).max() > 0.1   # β2's: the teacher differs from the student


def test_a_bfloat16_teacher_is_held_in_bfloat16(teacher_dir):
  path, _ = teacher_dir
  runs = [build.setup(config("configs/dpo.py:runlocal,loss=dadpo", **SMALL, teacher__mode="step",
                             teacher__path=path, teacher__dtype=d))
          for d in ("float32", "bfloat16")]
  f32, bf16 = (jax.tree.leaves(r.teacher.params) for r in runs)
  assert {x.dtype for x in f32} == {np.dtype("float32")}
  assert {x.dtype for x in bf16} == {np.dtype("bfloat16")}
  for a, b in zip(f32, bf16):
    assert a.sharding == b.sharding
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16), np.float32),
                                  np.asarray(b, np.float32))


def test_sequence_dadpo_in_step_matches_independent_scores(teacher_dir):
  check_sequence_dadpo(*teacher_dir)


def test_a_teacher_without_tokenizer_files(teacher_dir, tmp_path):
  """Like a reference, a Hugging Face teacher directory without tokenizer files is taken as
  is: its tokenizer cannot be compared with the student's."""
  path, _ = teacher_dir
  shutil.copytree(path, tmp_path / "bare", ignore=lambda d, files: [
      f for f in files if f.startswith(("tokenizer", "special_tokens"))])
  assert not reference.has_tokenizer(str(tmp_path / "bare"))
  runs = [build.setup(config("configs/dpo.py:runlocal,loss=dadpo", **SMALL, teacher__mode="step",
                             teacher__path=p)) for p in (path, str(tmp_path / "bare"))]
  jax.tree.map(np.testing.assert_array_equal, *(jax.device_get(r.teacher.params) for r in runs))


def test_precomputed_teacher_equals_in_step_teacher(teacher_dir, tmp_path):
  path, _ = teacher_dir
  out = {}
  for mode in ("step", "precomputed"):
    cfg = config("configs/dpo.py:runlocal,loss=dadpo", **SMALL, teacher__mode=mode,
                 teacher__path=path)
    run, held = setup_holding(cfg, tmp_path)
    assert (run.teacher.params is None) == (mode == "precomputed")
    teacher_bytes = sum(x.nbytes for x in jax.tree.leaves(run.teacher.params or {}))
    policy_bytes = sum(x.nbytes for x in jax.tree.leaves(run.state["params"]))
    # the reference (initial policy) and, in step mode only, the teacher's weights
    assert policy_bytes + teacher_bytes <= held < 1.25 * policy_bytes + teacher_bytes, held
    step = run.jit_train_step()
    state, hist = run.state, []
    for i in range(2):
      batch = build.to_device(train.microbatches(run.train_data(i), 1), run)
      state, m = step(state, run.frozen, batch)
      hist.append({k: float(v) for k, v in jax.device_get(m).items()})
    out[mode] = hist
  for a, b in zip(out["step"], out["precomputed"]):
    for k in ("loss", "rewards/margins", "lambda"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.fixture(scope="module")
def padded_teacher_dir(tmp_path_factory):
  """A teacher whose embedding is padded past the shared tokenizer's 264 ids, like Qwen2.5-7B's
  152,064 rows against the 1.5B student's 151,936."""
  from dpo_jax.data.tokenizer import byte_tokenizer
  from dpo_jax.models import TINY, init_params
  cfg = TINY.replace(hidden_size=96, num_heads=6, num_kv_heads=3, vocab_size=TINY.vocab_size + 24)
  path = tmp_path_factory.mktemp("padded_teacher") / "hf"
  hf_io.save_hf(str(path), cfg, init_params(cfg, 9), tokenizer=byte_tokenizer())
  return str(path), cfg


def check_token_kl(path, te_cfg):
  """daDPO_token's first step against full logits of both models, KL per predicted completion
  token in float64; the teacher's distribution is taken on the ids the two embeddings share."""
  cfg = config("configs/dpo.py:runlocal,loss=dadpo_token", **SMALL, loss__beta2=1.0,
               teacher__mode="step", teacher__path=path)
  run, batch_np, ex = first_step(cfg)
  def full_logits(model_cfg, params):
    model = core.merge(core.split(model_cfg)[0], params)
    h, _ = model(jnp.asarray(batch_np["tokens"]), jnp.asarray(batch_np["positions"]),
                 jnp.asarray(batch_np["segment_ids"]))
    return np.float64(jax.device_get(model.logits(h)))

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  shared = min(run.model_cfg.vocab_size, te_cfg.vocab_size)
  lp = log_softmax(full_logits(run.model_cfg, jax.device_get(run.state["params"])))[..., :shared]
  lt = log_softmax(full_logits(te_cfg, jax.device_get(run.teacher.params))[..., :shared])
  kl_pos = (np.exp(lt) * (lt - lp)).sum(-1)            # KL at each predicting position
  mask = batch_np["loss_mask"][:, 1:]                  # token t predicted from position t-1
  kl_seq = (kl_pos[:, :-1] * mask).sum(1)
  lens = mask.sum(1)
  b = len(ex["loss"])
  kl = (kl_seq[:b] + kl_seq[b:]) / (lens[:b] + lens[b:])
  np.testing.assert_allclose(ex["teacher_kl"], kl, rtol=1e-4, atol=1e-5)
  # At the first step ref = policy, so the loss is ln 2 + β2·KL.
  np.testing.assert_allclose(ex["loss"], np.log(2) + kl, rtol=1e-4, atol=1e-5)
  return run


def test_token_dadpo_kl_matches_full_logits(teacher_dir):
  check_token_kl(*teacher_dir)


def test_a_teacher_with_a_padded_embedding(padded_teacher_dir):
  """Its vocabulary is larger than the student's but the tokenizer is the same: accepted, and
  both daDPO forms match independent scores."""
  path, te_cfg = padded_teacher_dir
  run = check_token_kl(path, te_cfg)
  assert run.teacher.params["embed_tokens"]["embedding"].shape[0] == run.model_cfg.vocab_size + 24
  check_sequence_dadpo(path, te_cfg)


def test_teacher_errors_name_the_config_key(teacher_dir):
  path, _ = teacher_dir
  with pytest.raises(ValueError, match="config.teacher.path"):
    build.setup(config("configs/dpo.py:runlocal,loss=dadpo", **SMALL))
  with pytest.raises(ValueError, match="config.teacher.mode must be 'step'"):
    build.setup(config("configs/dpo.py:runlocal,loss=dadpo_token", **SMALL,
                       teacher__mode="precomputed", teacher__path=path))
  with pytest.raises(ValueError, match="reads no teacher"):
    build.setup(config(**SMALL, teacher__mode="step", teacher__path=path))


@pytest.mark.parametrize("loss", ["dadpo", "dadpo_token"])
def test_teacher_in_step_on_shared_prompt_rows(teacher_dir, loss):
  """The in-step teacher (sequence log-probs, token KL) reads shared-prompt rows [prompt |
  chosen | rejected] like one row per sequence: the same per-example loss and metrics."""
  from dpo_jax.data import packing
  path, _ = teacher_dir
  cfg = config(f"configs/dpo.py:runlocal,loss={loss}", **SMALL, loss__beta2=0.5,
               teacher__mode="step", teacher__path=path)
  run = build.setup(cfg)
  data = run.train_data
  shared = packing.PackedBatches(data.examples, cfg.batch_size, cfg.seed, data.buckets,
                                 data.pad_id, row_length=128, share_prompt=True)
  metrics = jax.jit(run.fns.example_metrics)
  state = run.state
  out = {}
  for name, batch in (("rows", data(0)), ("shared", shared(0))):
    out[name] = jax.device_get(metrics(state["params"], state["loss_state"], run.frozen,
                                       jax.tree.map(jnp.asarray, batch)))
  assert "source" in shared(0) and shared(0)["tokens"].shape[0] < data(0)["tokens"].shape[0]
  assert set(out["rows"]) == set(out["shared"])
  for k in out["rows"]:
    np.testing.assert_allclose(out["shared"][k], out["rows"][k], rtol=1e-5, atol=1e-5,
                               err_msg=k)
  key = "teacher_kl" if loss == "dadpo_token" else "loss"
  assert np.abs(out["rows"][key]).max() > 1e-3   # the teacher term is really there
