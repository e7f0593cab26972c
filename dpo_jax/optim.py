"""The optimiser: AdamW with linear warmup, cosine decay and global-norm clipping (optax)."""
import jax
import ml_collections
import optax


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int):
  """AdamW with linear warmup + cosine decay and global-norm clipping (TRL/HF defaults). As in
  transformers' Trainer, biases and norm scales get no weight decay; the warmup is
  round(warmup_ratio · steps) updates (transformers': the ceiling, one more at most)."""
  warmup = int(round(optim.warmup_ratio * total_steps))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=optim.lr * optim.final_lr_ratio)
  tx = optax.chain(
      optax.clip_by_global_norm(optim.clip) if optim.clip else optax.identity(),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay, mask=decayed))
  return tx, schedule


def decayed(params):
  """True for the weights AdamW decays: all but biases and norm scales (transformers' rule)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(n in jax.tree_util.keystr(path) for n in ("bias", "norm")), params)
