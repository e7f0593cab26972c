"""The whole DPO step against an independent PyTorch implementation of the same 3 steps.

A tiny random transformers LlamaForCausalLM (vocab 264 = byte tokenizer, d 32, 2 layers, 4 heads, 2
kv heads, MLP 64) is saved as a Hugging Face directory with dpo_jax's byte tokenizer. dpo_jax
trains it for 3 steps through build.setup / run.fns.train_step (jitted as train_and_evaluate does);
the test repeats the same 3 steps in plain PyTorch on the same numpy batches: summed completion
log-probs (token t predicted from position t-1, masked by loss_mask), the DPO loss -log σ(β((π_c −
ref_c) − (π_r − ref_r))) against a frozen copy, clip_grad_norm_, torch.optim.AdamW (weight decay on
the tensors transformers' Trainer decays: all but biases and norm weights, as dpo_jax) and a
LambdaLR written here for linear warmup from 0 + cosine decay to 0, evaluated at the update count
before the update (as optax). Compared at every step: loss, rewards/{chosen,rejected,margins},
logps/{chosen,rejected}, grad_norm, the learning rate, and every updated weight (HF name -> dpo_jax
param tree).

Cases (beta 0.1, lr 1e-2, clip 0.5, weight decay 0.01, Adam 0.9/0.999/1e-8, batch 8 pairs):
  accum1_warmup  grad_accum 1, mesh data=8, warmup 1 of 3: lr 0, 1e-2, 5e-3
  accum2_warmup  grad_accum 2 (4 pairs per micro-batch, so mesh data=4 × tensor=2: a micro-batch
                 must split over data×fsdp), compared with the SAME full-batch PyTorch run
  accum1_nowarm  grad_accum 1, no warmup: lr 1e-2, 7.5e-3, 2.5e-3, so the first update is not a
                 zero-lr one and loss/margins differ from ln 2 / 0 at steps 1 and 2
Clipping triggers at steps 0-1 (grad norms 0.59, 0.80, 0.38; nowarm 0.59, 0.40, 0.67).

Observed on CPU (f32, 8 fake devices), worst over the 3 steps (`pytest -s` prints them):
                 |Δloss|  |Δmargins| |Δrew/chosen| |Δlogps| |Δgrad_norm|  weights: max|Δ|  99th pct  ‖Δ‖/‖upd‖
  accum1_warmup  1.8e-7   4.8e-7     3.2e-6        5.3e-5   8.6e-7        3.2e-6          2.4e-7    3.0e-5
  accum2_warmup  1.2e-7   3.9e-7     3.3e-6        4.6e-5   6.9e-7        6.9e-6          2.6e-7    3.1e-5
  accum1_nowarm  6.6e-7   2.3e-6     2.4e-6        3.1e-5   5.4e-7        2.8e-4          6.4e-7    1.1e-3
(logps are sums of ~20 token log-probs, |logps| ~ 50-100.) Where the deviations come from:
  * optax computes Adam's bias correction 1 − b2^t in f32 (1 − 0.999f = 9.99987e-4, a 1.3e-5
    relative error at t=1); torch uses Python floats. So dpo_jax's updates are ~6e-6 relative
    off, i.e. ~1e-7 per weight (the 99th percentiles above) and ~1e-5 relative in the rewards.
  * Adam's update g/(√v + ε) is ill-conditioned for the few weights whose gradient is ~ε = 1e-8:
    f32 round-off in g moves their update by a few % of lr (the max|Δ| column; in the nowarm
    case at step 0, update −0.740 vs −0.757 (torch f32) for a float64 PyTorch value of −0.734,
    so torch f32 is the farther one). Checked once against a float64 PyTorch run: torch f32 is
    off by up to 2.3e-4 and dpo_jax by up to 6.7e-5; neither is a bug.
  * torch's clip_grad_norm_ scales by max_norm/(norm + 1e-6), optax by max_norm/norm: a
    1e-6/norm relative difference in the clipped gradient, far inside the tolerances.
Tolerances (5-10x the observed values; a real bug is O(lr) or O(1) relative; each check below
fails if torch is changed to: no weight decay / 2x weight decay, no clipping, beta 0.11,
eps 1e-6, the schedule shifted by one step, logps shifted by one token):
  loss, rewards/*, logps/*: atol 1e-5 + rtol 1e-4;  grad_norm: rtol 1e-4;  learning rate: 1e-6
  weights, every step: max|Δ| < 5e-4 (= 0.05·lr: a skipped or sign-flipped update is ~lr);
  per tensor, 99th percentile of |Δ| < 2e-6 (weight decay alone is lr·wd·|w| ~ 1e-5..1e-4);
  ‖Δ‖/‖update‖ < 3e-3 over all weights; a zero-lr update moves nothing.
Runtime on 2 CPU cores: 34 s wall for the module (27 s in the tests, 7-9 s per case, mostly the
step's XLA compile); ~50 s when the cores are shared. Dropping accum1_nowarm saves one compile.
"""
import copy
import json
import math
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from dpo_jax import build, configlib, train
from dpo_jax.data.tokenizer import byte_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEPS = 3
BATCH = 8
BETA = 0.1
LR = 1e-2
CLIP = 0.5   # grad norms are ~0.4-0.9 here: clipping triggers on some steps, not all
WEIGHT_DECAY = 0.01
B1, B2, EPS = 0.9, 0.999, 1e-8

ATOL_SCALAR = 1e-5
RTOL_SCALAR = 1e-4
ATOL_WEIGHT_MAX = 5e-4
ATOL_WEIGHT_Q99 = 2e-6
RTOL_UPDATE = 3e-3

# name: (grad_accum, warmup_ratio, mesh overrides)
CASES = {
    "accum1_warmup": (1, 1 / 3, {}),
    "accum2_warmup": (2, 1 / 3, {"mesh.tensor": 2}),
    "accum1_nowarm": (1, 0.0, {}),
}

WORDS = ["apple", "kiwi", "fig", "banana", "plum", "cherry", "lime", "mango", "pear", "date",
         "grape", "melon", "peach", "lemon", "olive", "guava"]


def _pairs(n: int = 16) -> list[dict]:
  """Sorting prompts of different lengths; rejected answers are wrongly ordered."""
  rng = np.random.RandomState(0)
  rows = []
  for i in range(n):
    k = 1 + i % 4
    words = [WORDS[j] for j in rng.choice(len(WORDS), size=k + 1, replace=False)]
    good = sorted(words)
    bad = good[::-1] if i % 2 else good[1:] + good[:1]
    rows.append({"prompt": f"sort: {' '.join(words)}\n",
                 "chosen": " ".join(good),
                 "rejected": " ".join(bad) + ("" if i % 3 else " ok")})
  return rows


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A random tiny Llama (std 0.1 so that the logits are not trivially flat) + byte tokenizer."""
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
      bos_token_id=257, eos_token_id=258, pad_token_id=256)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0.0, 0.1)
      if name.endswith("norm.weight"):
        p.add_(1.0)
  path = str(tmp_path_factory.mktemp("step_parity") / "hf")
  model.save_pretrained(path, safe_serialization=True)
  byte_tokenizer().save_pretrained(path)
  data = os.path.join(os.path.dirname(path), "pairs.jsonl")
  with open(data, "w") as f:
    for row in _pairs():
      f.write(json.dumps(row) + "\n")
  return path, data


def lr_factor(t: int, warmup: int, total: int) -> float:
  """Linear warmup 0 -> 1 over `warmup` updates, then cosine 1 -> 0 until `total`."""
  if t < warmup:
    return t / warmup
  progress = min((t - warmup) / max(total - warmup, 1), 1.0)
  return 0.5 * (1.0 + math.cos(math.pi * progress))


def torch_to_ours(model) -> dict:
  """The torch model's weights as dpo_jax's param tree (numpy), written out by hand."""
  sd = {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}
  c = model.config
  d, h, k = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
  dh = d // h
  layers = range(c.num_hidden_layers)

  def stack(fmt, fn):
    return np.stack([fn(sd[fmt.format(i)]) for i in layers])

  a, m = "model.layers.{}.self_attn.", "model.layers.{}.mlp."
  return {
      "embed_tokens": {"embedding": sd["model.embed_tokens.weight"]},
      "lm_head": {"kernel": sd["lm_head.weight"].T},
      "norm": {"scale": sd["model.norm.weight"]},
      "layers": {
          "input_layernorm": {"scale": stack("model.layers.{}.input_layernorm.weight",
                                             lambda w: w)},
          "post_attention_layernorm": {
              "scale": stack("model.layers.{}.post_attention_layernorm.weight", lambda w: w)},
          "self_attn": {
              "q_proj": {"kernel": stack(a + "q_proj.weight", lambda w: w.T.reshape(d, h, dh))},
              "k_proj": {"kernel": stack(a + "k_proj.weight", lambda w: w.T.reshape(d, k, dh))},
              "v_proj": {"kernel": stack(a + "v_proj.weight", lambda w: w.T.reshape(d, k, dh))},
              "o_proj": {"kernel": stack(a + "o_proj.weight", lambda w: w.T.reshape(h, dh, d))},
          },
          "mlp": {
              "gate_proj": {"kernel": stack(m + "gate_proj.weight", lambda w: w.T)},
              "up_proj": {"kernel": stack(m + "up_proj.weight", lambda w: w.T)},
              "down_proj": {"kernel": stack(m + "down_proj.weight", lambda w: w.T)},
          },
      },
  }


def torch_seq_logps(model, batch) -> torch.Tensor:
  """Σ over completion tokens of log p(token t | < t), one value per row [2B]."""
  tokens = torch.as_tensor(batch["tokens"], dtype=torch.long)
  logits = model(input_ids=tokens,
                 attention_mask=torch.as_tensor(batch["segment_ids"] > 0, dtype=torch.long),
                 position_ids=torch.as_tensor(batch["positions"], dtype=torch.long)).logits
  logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
  tok_logp = torch.gather(logp, 2, tokens[:, 1:, None])[..., 0]
  mask = torch.as_tensor(batch["loss_mask"][:, 1:], dtype=torch.float32)
  return (tok_logp * mask).sum(-1)


def torch_run(path: str, batches: list[dict], warmup: int) -> list[dict]:
  """The same STEPS DPO updates in plain PyTorch; per step metrics and updated weights."""
  torch.set_num_threads(2)
  policy = transformers.LlamaForCausalLM.from_pretrained(
      path, dtype=torch.float32, attn_implementation="eager").eval()
  ref = copy.deepcopy(policy).eval()
  for p in ref.parameters():
    p.requires_grad_(False)
  decay = set(transformers.Trainer.get_decay_parameter_names(None, policy))
  groups = [{"params": [p for n, p in policy.named_parameters() if (n in decay) == d],
             "weight_decay": WEIGHT_DECAY if d else 0.0} for d in (True, False)]
  assert all(g["params"] for g in groups)   # the norms are not decayed, the rest is
  opt = torch.optim.AdamW(groups, lr=LR, betas=(B1, B2), eps=EPS)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, warmup, STEPS))
  out = []
  for batch in batches:
    b = batch["valid"].shape[0]
    lr = opt.param_groups[0]["lr"]
    pol = torch_seq_logps(policy, batch)
    with torch.no_grad():
      rl = torch_seq_logps(ref, batch)
    chosen_r, rejected_r = BETA * (pol[:b] - rl[:b]), BETA * (pol[b:] - rl[b:])
    loss = -torch.nn.functional.logsigmoid(chosen_r - rejected_r).mean()
    opt.zero_grad()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm=CLIP)
    opt.step()
    sched.step()
    out.append({
        "loss": loss.item(), "rewards/margins": (chosen_r - rejected_r).mean().item(),
        "rewards/chosen": chosen_r.mean().item(), "rewards/rejected": rejected_r.mean().item(),
        "logps/chosen": pol[:b].mean().item(), "logps/rejected": pol[b:].mean().item(),
        "grad_norm": grad_norm.item(), "learning_rate": lr,
        "params": torch_to_ours(policy)})
  return out


def jax_run(path: str, data: str, grad_accum: int, warmup_ratio: float, mesh: dict):
  overrides = {"model.init": path, "data.train": data, "data.eval_fraction": 0.0,
               "data.max_length": 64, "data.max_prompt_length": 48,
               "batch_size": BATCH, "grad_accum": grad_accum, "steps": STEPS,
               "loss.beta": BETA, "reference.mode": "initial",
               "optim.lr": LR, "optim.warmup_ratio": warmup_ratio, "optim.final_lr_ratio": 0.0,
               "optim.clip": CLIP, "optim.weight_decay": WEIGHT_DECAY, "optim.b1": B1,
               "optim.b2": B2, "optim.eps": EPS, **mesh}
  config = configlib.load(os.path.join(REPO, "configs", "dpo.py"), overrides)
  run = build.setup(config)
  initial = jax.tree.map(np.asarray, jax.device_get(run.state["params"]))
  step_fn = run.jit_train_step()   # exactly as train_and_evaluate compiles it
  state = run.state
  batches, out = [], []
  for step in range(STEPS):
    batch_np = run.train_data(step)
    batches.append(batch_np)
    batch = build.to_device(train.microbatches(batch_np, grad_accum), run)
    state, metrics = step_fn(state, run.frozen, batch)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    metrics["params"] = jax.tree.map(np.asarray, jax.device_get(state["params"]))
    out.append(metrics)
  return initial, batches, out


def _flat(tree):
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


SCALARS = ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
           "logps/rejected")


_TORCH = {}   # warmup -> (batches, torch results): the accum cases share one PyTorch run


@pytest.mark.parametrize("case", list(CASES))
def test_three_dpo_steps_match_pytorch(case, hf_dir):
  path, data = hf_dir
  grad_accum, warmup_ratio, mesh = CASES[case]
  warmup = int(round(warmup_ratio * STEPS))
  initial, batches, ours = jax_run(path, data, grad_accum, warmup_ratio, mesh)

  # The batches are real: padded rows of different lengths, every row scored.
  for batch in batches:
    lens = (batch["segment_ids"] > 0).sum(1)
    assert lens.min() < lens.max() <= batch["tokens"].shape[1]
    assert (batch["loss_mask"].sum(1) > 0).all()

  if warmup not in _TORCH:
    _TORCH[warmup] = batches, torch_run(path, batches, warmup)
  torch_batches, theirs = _TORCH[warmup]
  for a, b in zip(batches, torch_batches):   # the same full batches, whatever grad_accum
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

  # Same starting point: the HF import equals the torch model's weights.
  start = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
  flat0, flat_start = _flat(initial), _flat(torch_to_ours(start))
  assert flat0.keys() == flat_start.keys()
  for k in flat0:
    np.testing.assert_array_equal(flat0[k], flat_start[k].astype(np.float32), err_msg=k)

  print(f"\n[{case}] grad_accum={grad_accum} warmup={warmup} mesh={mesh or 'data=8'}")
  clipped = 0
  for t, (o, r) in enumerate(zip(ours, theirs)):
    # Learning rate: optax's schedule at the update count before the update == our LambdaLR.
    expected_lr = LR * lr_factor(t, warmup, STEPS)
    np.testing.assert_allclose(o["learning_rate"], expected_lr, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(r["learning_rate"], expected_lr, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(o["grad_norm"], r["grad_norm"], rtol=RTOL_SCALAR,
                               err_msg=f"step {t}: grad_norm")
    clipped += o["grad_norm"] > CLIP
    diffs = {}
    for k in SCALARS:
      diffs[k] = abs(o[k] - r[k])
      np.testing.assert_allclose(o[k], r[k], rtol=RTOL_SCALAR, atol=ATOL_SCALAR,
                                 err_msg=f"step {t}: {k}")

    fo, fr = _flat(o["params"]), _flat(r["params"])
    fprev = _flat(initial if t == 0 else ours[t - 1]["params"])
    assert fo.keys() == fr.keys()
    diff = {k: np.abs(fo[k] - fr[k].astype(np.float32)).ravel() for k in fo}
    worst = max(diff, key=lambda k: diff[k].max())
    w_max = float(diff[worst].max())
    q99 = {k: float(np.quantile(v, 0.99)) for k, v in diff.items()}
    worst_q99 = max(q99, key=q99.get)
    update = math.sqrt(sum(float(np.sum((fo[k] - fprev[k]) ** 2)) for k in fo))
    rel = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in diff.values())) / max(
        update, 1e-30)
    moved = max(float(np.abs(fo[k] - fprev[k]).max()) for k in fo)
    print(f"  step {t}: lr {o['learning_rate']:.3g} grad_norm {o['grad_norm']:.4f} "
          f"loss {o['loss']:.6f} margins {o['rewards/margins']:.4f}\n"
          f"    |Δloss| {diffs['loss']:.2g} |Δmargins| {diffs['rewards/margins']:.2g} "
          f"|Δrewards/chosen| {diffs['rewards/chosen']:.2g} "
          f"max|Δlogps| {max(diffs['logps/chosen'], diffs['logps/rejected']):.2g} "
          f"|Δgrad_norm| {abs(o['grad_norm'] - r['grad_norm']):.2g}\n"
          f"    weights: max|Δ| {w_max:.2g} ({worst}), worst per-tensor 99th pct "
          f"{q99[worst_q99]:.2g} ({worst_q99}), ‖Δ‖/‖update‖ {rel:.2g}; max|update| {moved:.2g}")
    assert w_max < ATOL_WEIGHT_MAX, (t, worst, w_max)
    assert q99[worst_q99] < ATOL_WEIGHT_Q99, (t, worst_q99, q99[worst_q99])
    if expected_lr > 0:   # the update is visible: ~lr per weight, far above the tolerances
      assert moved > 0.5 * expected_lr, moved
      assert rel < RTOL_UPDATE, (t, rel)
    else:                 # a zero learning rate moves nothing (weight decay is scaled by lr too)
      assert moved == 0.0, moved
  assert clipped >= 1, [o["grad_norm"] for o in ours]
  # The updates changed the policy: by the last step it differs from the reference.
  assert abs(ours[-1]["rewards/margins"]) > 1e-2 and ours[-1]["loss"] < math.log(2) - 1e-2
