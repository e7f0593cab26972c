"""Loss state (BCO's δ, LCPO's η), weighted sums (MPO), and batch-level losses under sharding.

NumPy references come from test_losses.py. `run_all()` runs these checks outside pytest (for the
deviation table printed by `python tests/test_losses.py`).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dpo_jax import losses
from test_losses import (B, DEVIATIONS, bco_delta, f64, kto_z0, lcpo_parts,  # noqa: F401
                         make_batch, record, ref_aot, ref_aot_unpaired, ref_bco, ref_bco_pair,
                         ref_cpo, ref_dpo, ref_ipo, ref_kto, ref_orpo, ref_simpo, ref_sft,
                         ref_wpo, to_logps, wpo_weight)


def step_average(metrics: dict) -> dict:
  """What the train step hands update_state: per-example metrics averaged, group means over
  their rows, scalars as they are."""
  return {k: v.mean() if isinstance(v, losses.GroupMean) else jnp.mean(v) if jnp.ndim(v) else v
          for k, v in metrics.items()}


def run_sequence(spec, batches, **hp):
  state, out = spec.init_state(), []
  for b in batches:
    loss, metrics = spec(to_logps(b), **hp, **state)
    state = spec.update_state(state, step_average(metrics))
    out.append((loss, metrics, state))
  return out


# ---------------------------------------------------------------------------------------------
# Stateful losses.
# ---------------------------------------------------------------------------------------------


def test_bco_pair_delta_sequence():
  """δ = count-weighted mean of every β·r seen so far, this batch included; batch sizes vary."""
  batches = [make_batch(20 + i, "wide", n=n) for i, n in enumerate((48, 16, 48, 16))]
  seen = []
  for step, (b, (loss, metrics, state)) in enumerate(
      zip(batches, run_sequence(losses.get("bco_pair"), batches, beta=0.2))):
    b = f64(b)
    seen += list(0.2 * (b["pc"] - b["rc"])) + list(0.2 * (b["pr"] - b["rr"]))
    delta = np.mean(seen)
    record("bco_pair", "state δ sequence", state["delta"], delta)
    assert float(state["delta_count"]) == len(seen)
    record("bco_pair", "loss with running δ", loss,
           ref_bco_pair(b, beta=0.2, frozen_delta=delta))


def test_bco_pair_delta_equals_trl019_step_mean_for_equal_batches():
  """TRL 0.19 averaged per-step batch means; with equal batch sizes that is our δ."""
  batches = [make_batch(30 + i, "wide") for i in range(3)]
  step_means = [np.mean(np.concatenate([0.1 * (f64(b)["pc"] - f64(b)["rc"]),
                                        0.1 * (f64(b)["pr"] - f64(b)["rr"])])) for b in batches]
  *_, (_, _, state) = run_sequence(losses.get("bco_pair"), batches)
  record("bco_pair", "δ = TRL 0.19 mean of step means", state["delta"], np.mean(step_means))


def test_bco_unpaired_delta_sequence():
  batches = [make_batch(40 + i, "wide", unpaired=True, n=n) for i, n in enumerate((48, 16, 48))]
  seen = []
  for b, (loss, _, state) in zip(batches, run_sequence(losses.get("bco"), batches)):
    b = f64(b)
    seen += list(0.1 * (b["pc"] - b["rc"]))
    record("bco", "state δ sequence", state["delta"], np.mean(seen))
    record("bco", "loss with running δ", loss, ref_bco(b, frozen_delta=np.mean(seen)))


@pytest.mark.parametrize("name", ["bco_pair", "bco", "wpo(bco_pair)",
                                  "sigmoid:0.8+bco_pair:0.2"])
def test_bco_evaluation_uses_the_stored_delta(name):
  """Evaluation (LossSpec.at_eval: training=False) uses the stored δ, without folding the
  evaluated batch in, and reports the state unchanged, as TRL's BCOTrainer evaluates; training
  folds it in. Losses that take no `training` get the state alone."""
  spec = losses.get(name)
  unpaired = name == "bco"
  b = make_batch(95, "wide", unpaired=unpaired)
  b64, stored = f64(b), {"delta": 0.37, "delta_count": 24.0}
  prefix = "bco_pair/" if "+" in name else ""
  state = {prefix + k: jnp.asarray(v, jnp.float32) for k, v in stored.items()}
  assert "training" not in spec.hparams and spec.at_eval(state) == {**state, "training": False}
  ref = ref_bco if unpaired else ref_bco_pair
  for training, delta in ((False, stored["delta"]), (True, None)):
    kw = spec.at_eval(state) if not training else state
    loss, metrics = spec(to_logps(b), **kw)
    want = ref(b64, **stored, frozen_delta=delta)
    if name.startswith("wpo"):
      want = want * wpo_weight(b64)
    if "+" in name:
      want = 0.8 * ref_dpo(b64) + 0.2 * want
    record(name, f"loss, training={training}", loss, want)
    assert (float(metrics[prefix + "delta_count"]) == stored["delta_count"]) != training
  assert losses.get("dpo").at_eval(state) == state
  assert losses.get("lcpo(hinge)").at_eval({"eta": 0.5}) == {"eta": 0.5}


def test_lcpo_eta_sequence():
  batches = [make_batch(50 + i, "normal") for i in range(4)]
  eta = 0.9
  for b, (loss, _, state) in zip(batches, run_sequence(losses.get("lcpo"), batches,
                                                        eta_momentum=0.7)):
    b = f64(b)
    l_wl, l_lw, w = lcpo_parts(b, ref_dpo, {}, eta, "gibbs")
    record("lcpo", "loss with running η", loss, w * l_wl + (1 - w) * l_lw)
    eta = 0.7 * eta + 0.3 * np.mean(w)
    record("lcpo", "state η sequence", state["eta"], eta)


def test_state_under_jit():
  """State enters as traced hparams; one jitted step equals the eager one."""
  spec = losses.get("bco_pair")
  logps = to_logps(make_batch(60, "wide"))
  state = {"delta": jnp.float32(0.25), "delta_count": jnp.float32(64.0)}
  step = jax.jit(lambda lp, st: spec.update_state(st, step_average(spec(lp, **st)[1])))
  got = step(logps, state)
  want = spec.update_state(state, step_average(spec(logps, **state)[1]))
  np.testing.assert_allclose(got["delta"], want["delta"], rtol=1e-6)
  assert float(got["delta_count"]) == 64.0 + 2 * B


# ---------------------------------------------------------------------------------------------
# Weighted sums.
# ---------------------------------------------------------------------------------------------

MPO = {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}


def test_mpo_matches_sum_of_numpy_terms():
  b = make_batch(70, "wide")
  b64 = f64(b)
  spec = losses.combine(MPO)
  state = {"bco_pair/delta": 0.3, "bco_pair/delta_count": 40.0}
  loss, metrics = spec(to_logps(b), beta=0.2, **state)
  want = (0.8 * ref_dpo(b64, beta=0.2)
          + 0.2 * ref_bco_pair(b64, beta=0.2, delta=0.3, delta_count=40.0)
          + 1.0 * ref_sft(b64))
  record("combine", "MPO = 0.8 dpo + 0.2 bco_pair + 1.0 sft", loss, want)
  # Reward metrics come from the first term; every term's metrics are prefixed.
  record("combine", "MPO rewards/chosen", metrics["rewards/chosen"], 0.2 * (b64["pc"] - b64["rc"]))
  np.testing.assert_array_equal(metrics["lambda"], metrics["sigmoid/lambda"])
  record("combine", "MPO sft/loss", metrics["sft/loss"], ref_sft(b64))
  assert {"bco_pair/delta", "bco_pair/delta_count", "sft/rewards/chosen"} <= set(metrics)
  assert spec.needs_ref and not spec.unpaired
  assert set(spec.init_state()) == {"bco_pair/delta", "bco_pair/delta_count"}


def test_combine_string_syntax():
  a = losses.get("sigmoid:0.8+bco_pair:0.2+sft:1.0")
  assert a is losses.get("sigmoid:0.8+bco_pair:0.2+sft:1.0")  # one spec per name (cached)
  logps = to_logps(make_batch(71, "wide"))
  want, _ = losses.combine(MPO)(logps)
  got, _ = a(logps)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  got, _ = losses.get(" sigmoid:0.8 + bco_pair:0.2 + sft ")(logps)  # weight defaults to 1
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for bad in ("dpo:+sft", "dpo:x", "dpo+dpo", "dpo:1+nope"):
    with pytest.raises(KeyError):
      losses.get(bad)


def test_combine_hparam_routing_and_flags():
  b = make_batch(72, "wide")
  b64 = f64(b)
  # beta reaches dpo (not sft); alpha and normalize reach sft only.
  loss, _ = losses.get("dpo:0.5+sft:2")(to_logps(b), beta=0.3, alpha=0.5, normalize="example")
  record("combine", "dpo:0.5+sft:2 routing", loss,
         0.5 * ref_dpo(b64, beta=0.3) + 2 * ref_sft(b64, alpha=0.5, normalize="example"))
  # A wrapper term takes its base's hyperparameters.
  loss, _ = losses.get("wpo+cpo:0.5")(to_logps(b), base="ipo", beta=0.3)
  record("combine", "wpo(ipo)+0.5 cpo routing", loss,
         ref_wpo(b64, base_ref=ref_ipo, beta=0.3) + 0.5 * ref_cpo(b64, beta=0.3))
  with pytest.raises(TypeError):
    losses.get("dpo+sft")(to_logps(b), gamma=1.0)
  with pytest.raises(TypeError):
    losses.get("dpo+sft")(to_logps(b), **{"nope/delta": 1.0})
  with pytest.raises(ValueError):
    losses.combine({"dpo": 1.0, "kto": 1.0})
  assert not losses.get("simpo+sft:0.1").needs_ref
  assert losses.get("simpo+dpo").needs_ref
  assert losses.get("wpo+sft").token_stats == ("logsumsq",)
  hp = losses.get("sigmoid:0.8+bco_pair:0.2+sft:1.0").hparams
  assert hp["beta"] == 0.1 and hp["alpha"] == 1.0 and "delta" not in hp


def test_combine_conflicting_defaults_and_term_overrides():
  b = make_batch(73, "wide")
  b64 = f64(b)
  spec = losses.get("simpo+cpo:0.5")
  assert spec.hparams["beta"] is None  # simpo's default is 2.0, cpo's 0.1: each keeps its own
  loss, _ = spec(to_logps(b, ref=False), **spec.hparams)
  record("combine", "simpo+cpo:0.5 own defaults", loss, ref_simpo(b64) + 0.5 * ref_cpo(b64))
  loss, _ = spec(to_logps(b, ref=False), **{"simpo/beta": 2.5, "cpo/beta": 0.2})
  record("combine", "simpo+cpo:0.5 per-term beta", loss,
         ref_simpo(b64, beta=2.5) + 0.5 * ref_cpo(b64, beta=0.2))


def test_mpo_state_sequence_is_namespaced():
  batches = [make_batch(80 + i, "wide", n=n) for i, n in enumerate((48, 16))]
  alone = run_sequence(losses.get("bco_pair"), batches)
  mixed = run_sequence(losses.get("sigmoid:0.8+bco_pair:0.2+sft:1.0"), batches)
  for (_, _, s1), (_, _, s2) in zip(alone, mixed):
    assert set(s2) == {"bco_pair/delta", "bco_pair/delta_count"}
    record("combine", "MPO δ sequence = bco_pair alone", s2["bco_pair/delta"], s1["delta"])
    assert float(s2["bco_pair/delta_count"]) == float(s1["delta_count"])


# ---------------------------------------------------------------------------------------------
# Batch-level losses over 8 devices: jax.jit(in_shardings=P('data')) equals the global batch.
# ---------------------------------------------------------------------------------------------

SHARDED = [("aot", {}, ref_aot), ("aot_unpaired", {"label_smoothing": 0.1}, ref_aot_unpaired),
           ("bco_pair", {"delta": 0.2, "delta_count": 32.0}, ref_bco_pair), ("sft", {}, ref_sft)]
SHARDED_UNPAIRED = [("kto", {}, ref_kto), ("bco", {"delta": -0.1, "delta_count": 8.0}, ref_bco)]


def _all_batch_level(paired, unpaired):
  out = {name: losses.get(name)(paired, **hp) for name, hp, _ in SHARDED}
  out.update({name: losses.get(name)(unpaired, **hp) for name, hp, _ in SHARDED_UNPAIRED})
  return out


def test_batch_level_losses_sharded_equal_global():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  data = NamedSharding(mesh, P("data"))
  bp, bu = make_batch(90, "wide"), make_batch(91, "wide", unpaired=True)
  args = jax.device_put((to_logps(bp), to_logps(bu)), data)
  assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(args))
  sharded = jax.jit(_all_batch_level)(*args)
  one = jax.device_put((to_logps(bp), to_logps(bu)), jax.devices()[0])
  assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(one))
  unsharded = jax.jit(_all_batch_level)(*one)
  for name, hp, ref in SHARDED + SHARDED_UNPAIRED:
    got, want = sharded[name][0], unsharded[name][0]
    record(name, "8-way sharded vs unsharded", got, want, 1e-6, 1e-6)
    for key in ("delta", "kl"):  # batch statistics must be global too
      if key in sharded[name][1]:
        record(name, f"8-way sharded {key}", sharded[name][1][key], unsharded[name][1][key],
               1e-6, 1e-6)
    if ref is not None:
      b64 = f64(bu if name in ("kto", "bco") else bp)
      record(name, "8-way sharded vs NumPy", got, ref(b64, **hp))


def test_aot_sharded_sort_is_global():
  """The AOT check that matters: a per-shard sort would give different numbers."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  data = NamedSharding(mesh, P("data"))
  b = make_batch(92, "wide")
  b64 = f64(b)
  fn = jax.jit(lambda lp: losses.get("aot")(lp)[0], in_shardings=(data,))
  got = fn(jax.device_put(to_logps(b), data))
  record("aot", "8-way sharded vs NumPy global sort", got, ref_aot(b64))
  shard = lambda x: x.reshape(8, -1)
  per_shard = np.concatenate([ref_aot({k: (shard(v)[i] if isinstance(v, np.ndarray) and v.ndim
                                           and v.shape[0] == B else v) for k, v in b64.items()})
                              for i in range(8)])
  assert np.max(np.abs(np.asarray(got) - per_shard)) > 1e-3


# ---------------------------------------------------------------------------------------------
# How the train step calls losses: spec(logps, **spec.hparams, **state), padded batches.
# ---------------------------------------------------------------------------------------------

EXTRA_SPECS = ["wpo(simpo)", "lcpo(ipo)", "ld(bco_pair)", "wpo(bco_pair)", "simpo+cpo:0.5",
               "sigmoid:0.8+bco_pair:0.2+sft:1.0", "lcpo(aot)+sft:0.1"]


@pytest.mark.parametrize("name", losses.names() + EXTRA_SPECS)
def test_step_style_call(name):
  """Every spec takes all of its advertised hparams plus its state, and updates its state."""
  spec = losses.get(name)
  logps = to_logps(make_batch(100, "wide", unpaired=spec.unpaired), ref=spec.needs_ref)
  state = spec.init_state()
  loss, metrics = spec(logps, **spec.hparams, **state)
  assert loss.shape == (B,) and np.all(np.isfinite(loss)), name
  assert {"rewards/chosen", "rewards/rejected", "lambda"} <= set(metrics), name
  # unpaired rows' margins are the step's: the difference of the two group means
  assert ("rewards/margins" in metrics) != spec.unpaired, name
  new = spec.update_state(state, step_average(metrics))
  assert set(new) == set(state), name
  assert not set(state) & set(spec.hparams), name  # state is not a hyperparameter


def test_wrapper_names_bind_base():
  spec = losses.get("wpo(simpo)")
  assert spec is losses.get("wpo(simpo)") and spec.name == "wpo(simpo)"
  assert not spec.needs_ref and spec.hparams["beta"] == 2.0 and spec.hparams["gamma"] == 0.5
  assert losses.get("ld(bco_pair)").init_state() and losses.get("ld(simpo)").needs_tokens
  assert losses.get("lcpo(ipo)").init_state().keys() == {"eta"}
  with pytest.raises(KeyError):
    losses.get("dpo(simpo)")  # dpo takes no base
  with pytest.raises(ValueError):
    losses.get("lcpo(bco_pair)")  # two states
  with pytest.raises(ValueError):
    losses.get("wpo(kto)")


def test_padding_rows_are_skipped_by_batch_statistics():
  """With logps.valid, real rows get exactly the losses / statistics of the real rows alone."""
  valid = np.ones(B, np.float32)
  valid[np.random.default_rng(0).choice(B, 13, replace=False)] = 0.0
  real = valid > 0
  for unpaired, cases in ((False, [("aot", ref_aot, {}), ("aot_unpaired", ref_aot_unpaired, {}),
                                   ("bco_pair", ref_bco_pair, {"delta": 0.2, "delta_count": 8.0}),
                                   ("sft", ref_sft, {}), ("orpo", ref_orpo, {})]),
                          (True, [("kto", ref_kto, {}),
                                  ("bco", ref_bco, {"delta": 0.2, "delta_count": 8.0})])):
    b = make_batch(101, "wide", unpaired=unpaired)
    for k in ("pc", "pr", "rc", "rr"):  # garbage in padding rows
      b[k] = np.where(real, b[k], -1e5).astype(np.float32)
    sub = {k: (v[real] if isinstance(v, np.ndarray) else v) for k, v in f64(b).items()}
    lp = to_logps(b)._replace(valid=jnp.asarray(valid))
    for name, ref, hp in cases:
      loss, metrics = losses.get(name)(lp, **hp)
      assert np.all(np.isfinite(loss)), name
      record(name, "padding rows skipped", np.asarray(loss)[real], ref(sub, **hp))
  b = make_batch(102, "wide", unpaired=True)
  sub = {k: (v[real] if isinstance(v, np.ndarray) else v) for k, v in f64(b).items()}
  _, m = losses.get("kto")(to_logps(b)._replace(valid=jnp.asarray(valid)))
  record("kto", "z0 over real rows", m["kl"], kto_z0(sub))
  _, m = losses.get("bco")(to_logps(b)._replace(valid=jnp.asarray(valid)))
  record("bco", "δ over real rows", m["delta"], bco_delta(0.1 * (sub["pc"] - sub["rc"])))
  assert float(m["delta_count"]) == real.sum()
  b = make_batch(103, "normal")
  sub = {k: (v[real] if isinstance(v, np.ndarray) else v) for k, v in f64(b).items()}
  _, m = losses.get("lcpo")(to_logps(b)._replace(valid=jnp.asarray(valid)), eta_momentum=0.5)
  w = lcpo_parts(sub, ref_dpo, {}, 0.9, "gibbs")[2]
  record("lcpo", "η over real rows", m["eta_next"], 0.5 * 0.9 + 0.5 * w.mean())


@pytest.mark.parametrize("name", losses.names() + EXTRA_SPECS)
def test_empty_padding_rows_stay_finite(name):
  """Rows that pad a batch hold no tokens (lengths 0, every log-prob 0, valid 0), so a loss that
  divides by a length meets the clamp at 1: loss and gradient stay finite, and the real rows'
  losses are those of the real rows alone."""
  spec = losses.get(name)
  n = B - 8
  b = make_batch(104, "wide", unpaired=spec.unpaired)
  real = {k: (v[:n] if isinstance(v, np.ndarray) else v) for k, v in b.items()}
  padded = {k: (np.concatenate([v[:n], np.zeros_like(v[n:])]) if isinstance(v, np.ndarray)
                else v) for k, v in b.items()}
  valid = jnp.asarray(np.arange(B) < n, jnp.float32)
  state = spec.init_state()

  def total(pc, pr, tpc, tpr):
    lp = to_logps(padded, ref=spec.needs_ref)._replace(
        policy_chosen=pc, policy_rejected=pr, policy_chosen_tokens=tpc,
        policy_rejected_tokens=tpr, valid=valid)
    loss = spec(lp, **spec.hparams, **state)[0]
    return jnp.sum(loss * valid), loss

  lp = to_logps(padded, ref=spec.needs_ref)
  (_, loss), grads = jax.value_and_grad(total, argnums=(0, 1, 2, 3), has_aux=True)(
      lp.policy_chosen, lp.policy_rejected, lp.policy_chosen_tokens, lp.policy_rejected_tokens)
  assert np.all(np.isfinite(loss)), name
  for g in grads:
    assert np.all(np.isfinite(g)), name
  alone = spec(to_logps(real, ref=spec.needs_ref), **spec.hparams, **state)[0]
  record(name, "empty padding rows", np.asarray(loss)[:n], alone, 1e-5, 1e-6)


def run_all():
  for name, fn in list(globals().items()):
    if not (name.startswith("test_") and callable(fn)):
      continue
    cases = [m.args[1] for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
    for case in (cases[0] if cases else [()]):
      fn(*([case] if cases else []))
