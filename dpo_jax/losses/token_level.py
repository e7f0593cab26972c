"""Losses built from per-token log-probs (needs_tokens=True).

Per-token fields are [B, T], completion tokens left-aligned, zero beyond each length; token k is
valid iff k < length.
"""
import jax.numpy as jnp

from dpo_jax.losses.core import PairLogps, get, register, token_mask


def ld_sum(tokens, length, shared, ld_alpha):
  """Σ_{k<shared} logp_k + α·Σ_{shared≤k<length} logp_k."""
  pos = jnp.arange(tokens.shape[1])[None, :]
  valid = token_mask(tokens, length)
  head = jnp.sum(jnp.where(valid & (pos < shared[:, None]), tokens, 0.0), axis=1)
  tail = jnp.sum(jnp.where(valid & (pos >= shared[:, None]), tokens, 0.0), axis=1)
  return head + ld_alpha * tail


@register("ld", aliases=("ld_dpo",), needs_tokens=True)
def ld(logps: PairLogps, *, base: str = "dpo", ld_alpha: float = 0.5, **hparams):
  """LD-DPO (Liu et al., 2024, arXiv 2409.06411): length-desensitised sequence log-probs.

  S_LD(y) = Σ_{t≤ℓ} logp_t + α·Σ_{t>ℓ} logp_t with ℓ = min(|y_w|, |y_l|), for the policy and (when
  its tokens are given) the reference, then the base loss on S_LD. Matches TRL ld_alpha=α with
  loss_type=base. α ∈ [0, 1]; α=1 is the base loss. Default α=0.5 is ours (TRL: None = off).
  The step's logps/* metrics stay the plain sums; `ld_logps/*` are the policy's S_LD, which
  TRL logs as logps/*.
  """
  spec = get(base)
  shared = jnp.minimum(logps.chosen_len, logps.rejected_len)
  fields = {}
  for name in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"):
    tokens = getattr(logps, name + "_tokens")
    if tokens is not None:
      length = logps.chosen_len if name.endswith("chosen") else logps.rejected_len
      fields[name] = ld_sum(tokens, length, shared, ld_alpha)
  loss, metrics = spec(logps._replace(**fields), **hparams)
  return loss, {**metrics, "ld_logps/chosen": fields["policy_chosen"],
                "ld_logps/rejected": fields["policy_rejected"]}
