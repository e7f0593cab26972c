import numpy as np

from dpo_jax import losses


def test_dpo_shift_matches_numpy():
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (rng.normal(-50, 20, 64) for _ in range(4))
  logps = losses.PairLogps(pc, pr, rc, rr)
  loss, _ = losses.get("dpo_shift")(logps, beta=0.5, shift=0.7)
  z = 0.5 * (pc - rc) - 0.7 * 0.5 * (pr - rr)
  np.testing.assert_allclose(loss, np.logaddexp(0, -z), rtol=1e-5, atol=1e-5)
  dpo, _ = losses.get("dpo")(logps, beta=0.5)
  np.testing.assert_allclose(losses.get("dpo_shift")(logps, beta=0.5, shift=1.0)[0], dpo,
                             rtol=1e-6)
