"""Preference losses: one pure function per loss, selected by name.

    from dpo_jax import losses
    loss_B, metrics = losses.get("dpo")(logps, beta=0.1)
    mpo = losses.get("sigmoid:0.8+bco_pair:0.2+sft:1.0")      # weighted sum, see combine.py
    wpo = losses.get("wpo(simpo)")                            # a wrapper bound to its base

Modules: dpo (margin losses), pointwise (per-completion reward losses, bco_pair), fdiv (f-DPO),
batch_level (AOT), reference_free (sft, simpo, cpo, orpo), unpaired (kto, bco, npo),
token_level (ld), wrappers (wpo, lcpo), distill (dadpo).
"""
from dpo_jax.losses.core import (LossSpec, PairLogps, get, log_sigmoid, names, register,
                                 reward_metrics, rewards, swap_pair, with_base)
from dpo_jax.losses.combine import combine

# Importing a loss module registers its losses.
from dpo_jax.losses import dpo  # noqa: F401,E402
from dpo_jax.losses import pointwise  # noqa: F401,E402
from dpo_jax.losses import fdiv  # noqa: F401,E402
from dpo_jax.losses import batch_level  # noqa: F401,E402
from dpo_jax.losses import reference_free  # noqa: F401,E402
from dpo_jax.losses import unpaired  # noqa: F401,E402
from dpo_jax.losses import token_level  # noqa: F401,E402
from dpo_jax.losses import wrappers  # noqa: F401,E402
from dpo_jax.losses import distill  # noqa: F401,E402
from dpo_jax.losses.unpaired import udm_weight  # noqa: E402
from dpo_jax.losses.wrappers import lcpo_spec, wpo_spec  # noqa: E402
