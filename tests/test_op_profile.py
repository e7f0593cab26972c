"""benchmarks/op_profile.py's accounting of XLA:CPU's plain (Eigen) dots, whose trace events
cover only their launch: it must find every dot that runs as its own op, and no dot inside a
fusion, and rebuild each one so that it can be timed alone."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from helpers import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import op_profile  # noqa: E402

# A module as XLA prints it after compilation, cut down by hand: a fusion whose computation
# holds a dot, a plain dot in the entry computation, and a batched plain dot in a while body.
HLO = """\
HloModule jit_f, entry_computation_layout={(f32[64,24]{1,0})->f32[24,40]{1,0}}

%fused_computation.3 (param_0.1: f32[64,24], param_1.1: f32[24,40]) -> f32[64,40] {
  %param_0.1 = f32[64,24]{1,0} parameter(0)
  %param_1.1 = f32[24,40]{1,0} parameter(1)
  %dot_general.9 = f32[64,40]{1,0} dot(%param_0.1, %param_1.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %tanh.1 = f32[64,40]{1,0} tanh(%dot_general.9)
}

%body.2 (p.4: (s32[], f32[2,3,16,8])) -> (s32[], f32[2,3,16,8]) {
  %p.4 = (s32[], f32[2,3,16,8]{3,2,1,0}) parameter(0)
  %gte.1 = f32[2,3,16,8]{3,2,1,0} get-tuple-element(%p.4), index=1
  %dot.7 = f32[2,3,16,16]{3,2,1,0} dot(%gte.1, %gte.1), lhs_batch_dims={0,1}, lhs_contracting_dims={3}, rhs_batch_dims={0,1}, rhs_contracting_dims={3}, metadata={op_name="jit(f)/attention_core/dot_general"}
  ROOT %t.1 = (s32[], f32[2,3,16,8]{3,2,1,0}) tuple(%gte.1, %gte.1)
}

ENTRY %main.5 (x.1: f32[64,24], g.1: f32[64,40], w.1: f32[24,40]) -> f32[24,40] {
  %x.1 = f32[64,24]{1,0} parameter(0)
  %g.1 = f32[64,40]{1,0} parameter(1)
  %w.1 = f32[24,40]{1,0} parameter(2)
  %ynn_fusion.3 = f32[64,40]{1,0} fusion(%x.1, %w.1), kind=kCustom, calls=%fused_computation.3, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  ROOT %dot.1 = f32[24,40]{1,0} dot(%x.1, %g.1), lhs_contracting_dims={0}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/transpose"}
}
"""


def test_plain_dots_finds_the_dots_outside_fusions():
  dots = {d["name"]: d for d in op_profile.plain_dots(HLO)}
  assert set(dots) == {"dot.1", "dot.7"}   # not dot_general.9, inside %fused_computation.3
  weight_grad, scores = dots["dot.1"], dots["dot.7"]
  assert (weight_grad["dtype"], weight_grad["lhs_shape"], weight_grad["rhs_shape"]) == (
      "f32", (64, 24), (64, 40))
  assert weight_grad["dims"] == {"lhs_contracting_dims": (0,), "rhs_contracting_dims": (0,)}
  assert (scores["lhs_shape"], scores["rhs_shape"]) == ((2, 3, 16, 8), (2, 3, 16, 8))
  assert scores["dims"] == {"lhs_batch_dims": (0, 1), "lhs_contracting_dims": (3,),
                            "rhs_batch_dims": (0, 1), "rhs_contracting_dims": (3,)}
  assert weight_grad["signature"] != scores["signature"]


def test_plain_dots_of_a_compiled_program_rebuild_its_results():
  """On a real compiled program: the weight-gradient dot xᵀg (both operands contracted on
  their first axis, which XLA:CPU leaves to Eigen) is found, and the dot_general rebuilt from
  what the text says computes it."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 24)).astype(np.float32)
  g = rng.standard_normal((64, 40)).astype(np.float32)
  text = jax.jit(lambda x, g: x.T @ g).lower(x, g).compile().as_text()
  dots = op_profile.plain_dots(text)
  assert len(dots) == 1, text
  (dot,) = dots
  assert (dot["lhs_shape"], dot["rhs_shape"]) == ((64, 24), (64, 40))
  np.testing.assert_allclose(np.asarray(op_profile.dot_fn(dot)(jnp.asarray(x), jnp.asarray(g))),
                             x.astype(np.float64).T @ g, rtol=1e-5, atol=1e-4)
  assert op_profile.time_alone(dot, reps=2) > 0
