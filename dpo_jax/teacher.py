"""daDPO's teacher: a frozen model whose distribution enters the loss (arXiv 2506.15717).

The teacher may have its own architecture (larger than the student) but must share the
student's tokenizer; its embedding may be padded to another size (check_vocabulary). What the
step gets from it depends on the loss:

  sequence level  (loss dadpo, extra_keys teacher_chosen / teacher_rejected): its summed
                  log-probs of each completion, computed in the step (config.teacher.mode='step')
                  or once into W/teacher_cache/ ('precomputed', keyed like the reference cache).
  token level     (loss dadpo_token, token_stats teacher_kl): its hidden states, from which the
                  student's chunked log-prob loop computes KL(π_te ‖ π_θ) per token without
                  materialising either model's full logits; needs mode='step'.

Like the reference, the teacher runs under stop_gradient and is never in the optimizer state.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax

from dpo_jax import reference
from dpo_jax.models import core, load, logprobs
from dpo_jax.models.config import check_dtype

MODES = ("none", "step", "precomputed")
SEQUENCE_KEYS = ("teacher_chosen", "teacher_rejected")


@dataclasses.dataclass
class Teacher:
  mode: str
  params: Any
  fn: Callable[[Any, dict], Optional[dict]]
  columns: Callable[[list, str], dict] = reference.no_columns


def needs(spec) -> tuple[bool, bool]:
  """(sequence-level log-probs, token-level KL) that loss `spec` reads from the teacher."""
  return (any(k in spec.extra_keys for k in SEQUENCE_KEYS), "teacher_kl" in spec.token_stats)


def check_vocabulary(teacher_vocab: int, student_vocab: int, tokenizer, path: str):
  """Embeddings of different sizes are accepted when both cover every id the (shared) tokenizer
  can produce: the extra rows are padding (Qwen2.5-7B has 152,064, 1.5B 151,936, for 151,665
  tokens), and the token-level KL compares the distributions on the shared ids."""
  if teacher_vocab == student_vocab:
    return
  if tokenizer is None:
    raise ValueError(f"config.teacher.path={path}: vocabulary of {teacher_vocab} tokens, the "
                     f"student has {student_vocab}, and no tokenizer shows which ids are used")
  if len(tokenizer) > min(teacher_vocab, student_vocab):
    raise ValueError(f"config.teacher.path={path}: vocabulary of {teacher_vocab} tokens, the "
                     f"student has {student_vocab}, and their tokenizer has {len(tokenizer)}: "
                     "each embedding must cover every token id")


def build(teacher_cfg, spec, student_cfg, mesh, rules, *, chunk: int, workdir: str | None,
          batch_size: int, buckets, pad_id: int, student_tokenizer=None) -> Teacher:
  """teacher_cfg is config.teacher (mode, path, dtype); student_tokenizer, when given, must
  match the teacher's (a Hugging Face directory without tokenizer files cannot be checked)."""
  if teacher_cfg.mode not in MODES:
    raise ValueError(f"config.teacher.mode must be one of {MODES}, got {teacher_cfg.mode!r}")
  check_dtype(teacher_cfg.dtype, "config.teacher.dtype")
  seq, kl = needs(spec)
  if not (seq or kl):
    if teacher_cfg.mode != "none":
      raise ValueError(f"config.teacher.mode={teacher_cfg.mode!r} but loss {spec.name!r} reads "
                       "no teacher; set config.teacher.mode='none'")
    return Teacher("none", None, lambda params, batch: None)
  if teacher_cfg.mode == "none" or not teacher_cfg.path:
    raise ValueError(f"loss {spec.name!r} needs a teacher: set config.teacher.path and "
                     "config.teacher.mode ('step' or 'precomputed')")
  if kl and teacher_cfg.mode != "step":
    raise ValueError(f"loss {spec.name!r} needs the teacher's token distributions: "
                     "config.teacher.mode must be 'step'")
  cfg = load.model_config(teacher_cfg.path, student_cfg,
                          **{**load.numerics(student_cfg), "param_dtype": teacher_cfg.dtype})
  if student_tokenizer is not None and reference.has_tokenizer(teacher_cfg.path):
    reference.check_tokenizer(load.load_tokenizer(teacher_cfg.path), student_tokenizer,
                              f"config.teacher.path={teacher_cfg.path}")
  check_vocabulary(cfg.vocab_size, student_cfg.vocab_size, student_tokenizer, teacher_cfg.path)
  params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(teacher_cfg.dtype), p))(
      load.load_params(teacher_cfg.path, cfg, mesh, rules))
  graphdef = core.split(cfg)[0]

  if teacher_cfg.mode == "precomputed":
    if workdir is None:
      raise ValueError("config.teacher.mode='precomputed' needs a workdir for its cache")
    columns = reference.cached_columns("teacher", graphdef, params, mesh, rules, chunk=chunk,
                                       workdir=workdir, batch_size=batch_size,
                                       buckets=buckets, pad_id=pad_id,
                                       extra=(reference.forward_key(cfg),))
    return Teacher("precomputed", None,
                   lambda params_, batch: {"logps": batch["teacher_logps"]}, columns)

  def forward(teacher_params, batch):
    model = core.merge(graphdef, teacher_params)
    hidden, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"])
    out = {}
    if seq:
      tok = logprobs.batch_token_stats(hidden, model.unembedding(), batch, chunk=chunk)
      out["logps"] = logprobs.reduce_sequences(tok, batch)["logps"]
    if kl:
      out["hidden"], out["unembed"] = hidden, model.unembedding()
    return jax.lax.stop_gradient(out)

  return Teacher("step", params, forward)


def kl_teacher(out: Optional[dict]):
  """The (hidden, unembedding) pair the student's log-prob loop needs, or None."""
  if out is None or "hidden" not in out:
    return None
  return out["hidden"], out["unembed"]

