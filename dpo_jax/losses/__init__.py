"""Preference losses: one pure function per loss, selected by name.

    from dpo_jax import losses
    loss_B, metrics = losses.get("dpo")(logps, beta=0.1)
    mpo = losses.get("sigmoid:0.8+bco_pair:0.2+sft:1.0")      # weighted sum, see combine.py
    wpo = losses.get("wpo(simpo)")                            # a wrapper bound to its base

Modules: dpo (margin losses), pointwise (per-completion reward losses, bco_pair), fdiv (f-DPO),
batch_level (AOT), reference_free (sft, simpo, cpo, orpo), unpaired (kto, bco, npo),
token_level (ld), wrappers (wpo, lcpo), distill (dadpo), dpo_shift (the README's example).
"""
from dpo_jax.losses.core import (GroupMean, LossSpec, PairLogps, get, log_sigmoid, names,
                                 register, reward_metrics, rewards, swap_pair, with_base)
from dpo_jax.losses.combine import combine

# Importing a loss module registers its losses; every module in this package is imported, so a
# new loss is one new file (README: "Adding a loss").
import importlib as _importlib  # noqa: E402
import pkgutil as _pkgutil  # noqa: E402

for _m in _pkgutil.iter_modules(__path__):
  _importlib.import_module(f"{__name__}.{_m.name}")

from dpo_jax.losses.unpaired import udm_weight  # noqa: E402
from dpo_jax.losses.wrappers import lcpo_spec, wpo_spec  # noqa: E402
