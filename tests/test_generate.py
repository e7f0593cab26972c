"""Sampling with a KV cache (dpo_jax.generate) against full forwards, transformers and NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process

from dpo_jax import generate, models, sharding
from dpo_jax.data import preference
from dpo_jax.models import hf_io
from helpers_hf import our_logits, tiny_hf_model, tiny_tokenizer

CFG = models.ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_layers=2, num_heads=4, num_kv_heads=2)
PROMPTS = [[5, 9, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42], [7, 7, 30, 12, 63, 0]]
N = 10        # one max_new_tokens (and batch of 4) throughout, so compiled programs are shared
WIDTH = 64    # the naive loop's fixed sequence length: one compiled forward per model


def random_params(cfg, seed=0, std=0.2):
  """std 0.2 weights (norm scales 1 + noise) so that the argmax is not degenerate."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    a = rng.normal(0.0, std, x.shape).astype(np.float32)
    if "scale" in jax.tree_util.keystr(path):
      a += 1.0
    return jnp.asarray(a)
  return jax.tree_util.tree_map_with_path(leaf, models.abstract_params(cfg))


@pytest.fixture(scope="module")
def params():
  return random_params(CFG, seed=1)


def last_logits(cfg, params, prompt):
  """The next-token logits after `prompt` by one full forward (fixed width WIDTH)."""
  tokens = np.zeros((1, WIDTH), np.int32)
  tokens[0, :len(prompt)] = prompt
  seg = (np.arange(WIDTH) < len(prompt)).astype(np.int32)[None]
  return our_logits(cfg, params, tokens, None, seg)[0, len(prompt) - 1].astype(np.float64)


def naive_greedy(cfg, params, prompt, n, eos_id=None):
  """Repeated full forwards (no cache) over the growing sequence; argmax of the last position.

  The sequence is right-padded to a fixed length with segment id 0 (never attended), so one
  compiled forward serves every step. Returns (tokens, summed log-probs, per-token log-probs).
  """
  assert len(prompt) + n <= WIDTH
  seq, logps = list(prompt), []
  for _ in range(n):
    logits = last_logits(cfg, params, seq)
    tok = int(np.argmax(logits))
    logps.append(logits[tok] - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max())
    seq.append(tok)
    if eos_id is not None and tok == eos_id:
      break
  return seq[len(prompt):], float(np.sum(logps)), logps


# ---------------------------------------------------------------------------------------------
# 1. Cache vs repeated full forwards.
# ---------------------------------------------------------------------------------------------


def test_greedy_cache_equals_full_forwards(params):
  n = N
  out = generate.sample(CFG, params, PROMPTS, max_new_tokens=n, greedy=True, return_logps=True)
  for r, prompt in enumerate(PROMPTS):
    want, want_logp, _ = naive_greedy(CFG, params, prompt, n)
    assert out["tokens"][r] == want, r
    assert len(set(want)) > 2, "degenerate model: the test would prove little"
    np.testing.assert_allclose(out["logps"][r], want_logp, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(out["lengths"], [n] * len(PROMPTS))
  assert not out["finished"].any()


# ---------------------------------------------------------------------------------------------
# 2. Against transformers' generate.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
  model = tiny_hf_model("llama", seed=3)
  model.generation_config.eos_token_id = None   # never stop early: compare all N tokens
  model.generation_config.pad_token_id = 0
  path = str(tmp_path_factory.mktemp("gen") / "hf")
  model.save_pretrained(path)
  cfg, params = hf_io.load_hf(path)
  return model, cfg, params


def test_greedy_matches_transformers(hf_pair):
  model, cfg, params = hf_pair
  n = 10
  prompts = [[1, 17, 33, 5], [1, 90, 4, 4, 61, 12, 8], [1]]
  ours = generate.sample(cfg, params, prompts, max_new_tokens=n, greedy=True)["tokens"]
  for r, p in enumerate(prompts):   # one prompt at a time: no padding on the torch side
    with torch.no_grad():
      got = model.generate(torch.tensor([p]), attention_mask=torch.ones_like(torch.tensor([p])),
                           do_sample=False, max_new_tokens=n)
    assert ours[r] == got[0, len(p):].tolist(), r
  # A left-padded batch (transformers derives positions from the attention mask).
  width = max(map(len, prompts))
  ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  with torch.no_grad():
    got = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n)
  assert ours == got[:, width:].tolist()


# ---------------------------------------------------------------------------------------------
# 3. EOS.
# ---------------------------------------------------------------------------------------------


def test_eos_stops_rows(params):
  n = N
  free = generate.sample(CFG, params, PROMPTS, max_new_tokens=n, greedy=True, return_logps=True)
  row0 = free["tokens"][0]
  step = next(i for i in range(2, n) if row0[i] not in row0[:i])   # first time at step >= 2
  eos = row0[step]
  pad = 63 if eos != 63 else 62
  out = generate.sample(CFG, params, PROMPTS, max_new_tokens=n, greedy=True, eos_id=eos,
                        pad_id=pad, return_logps=True)
  for r, prompt in enumerate(PROMPTS):
    full = free["tokens"][r]
    cut = full[:full.index(eos) + 1] if eos in full else full
    assert out["tokens"][r] == cut, r
    assert out["lengths"][r] == len(cut)
    assert out["finished"][r] == (eos in full)
    # Positions after EOS hold pad; log-probs stop accumulating at EOS (EOS itself counts).
    np.testing.assert_array_equal(out["token_array"][r, len(cut):], pad)
    np.testing.assert_array_equal(out["token_array"][r, :len(cut)], cut)
    _, _, per_token = naive_greedy(CFG, params, prompt, n)
    np.testing.assert_allclose(out["logps"][r], np.sum(per_token[:len(cut)]), atol=1e-5)
  assert out["tokens"][0] == row0[:step + 1] and out["finished"][0]


def test_eos_everywhere_stops_early_and_pads(params):
  """When every row has finished the loop stops; the unfilled tail is pad."""
  first = generate.sample(CFG, params, PROMPTS, max_new_tokens=N, greedy=True)["tokens"]
  out = generate.sample(CFG, params, [PROMPTS[0]] * 4, max_new_tokens=N, greedy=True,
                        eos_id=first[0][0], pad_id=0)
  assert out["tokens"] == [first[0][:1]] * 4
  np.testing.assert_array_equal(out["lengths"], 1)
  np.testing.assert_array_equal(out["token_array"][:, 1:], 0)


def test_any_of_several_eos_ids_ends_a_row_as_in_transformers(hf_pair):
  """A Llama 3 Instruct config lists several EOS ids: any of them ends a row, as in transformers'
  generate, and generate_text stops on the config's ids as well as the tokenizer's."""
  model, cfg, params = hf_pair
  n, prompts = 10, [[1, 17, 33, 5], [1, 90, 4, 4, 61, 12, 8]]
  free = generate.sample(cfg, params, prompts, max_new_tokens=n, greedy=True)["tokens"]
  firsts = [next(t for i, t in enumerate(row) if i >= 2 and t not in row[:i]) for row in free]
  stops = sorted(set(firsts))
  ours = generate.sample(cfg, params, prompts, max_new_tokens=n, greedy=True, eos_id=stops,
                         pad_id=0)
  for r, p in enumerate(prompts):
    with torch.no_grad():
      got = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=int),
                           do_sample=False, max_new_tokens=n, eos_token_id=stops)
    want = got[0, len(p):].tolist()
    assert ours["tokens"][r] == want and want[-1] in stops and len(want) < n, r
    assert ours["finished"][r]
  tok = tiny_tokenizer(cfg.vocab_size)
  assert tok.eos_token_id not in stops
  llama3 = cfg.replace(eos_token_id=(tok.eos_token_id, *stops))
  assert generate.stop_ids(llama3, tok) == (tok.eos_token_id, *stops)
  text = generate.generate_text(llama3, params, tok, ["w17 w33 w5"], max_new_tokens=n,
                                greedy=True)
  alone = generate.generate_text(cfg.replace(eos_token_id=None), params, tok, ["w17 w33 w5"],
                                 max_new_tokens=n, greedy=True, eos_id=None)["tokens"][0]
  cut = next(i for i, t in enumerate(alone) if t in (tok.eos_token_id, *stops)) + 1
  assert cut < n and text["tokens"][0] == alone[:cut]

  # generation_config.json's stop ids count too (Llama 3 Instruct lists <|eot_id|> there)
  assert generate.stop_ids(cfg, tok, {"eos_token_id": stops}) == (tok.eos_token_id, *stops)
  assert generate.stop_ids(cfg, tok, {"eos_token_id": stops[0]})[-1] == stops[0]
  from_file = generate.generate_text(cfg, params, tok, ["w17 w33 w5"], max_new_tokens=n,
                                     greedy=True, generation_config={"eos_token_id": stops})
  assert from_file["tokens"][0] == alone[:cut]


# ---------------------------------------------------------------------------------------------
# 4. Sampling: top-k / top-p / temperature.
# ---------------------------------------------------------------------------------------------


def test_degenerate_sampling_equals_greedy(params):
  n = N
  greedy = generate.sample(CFG, params, PROMPTS, max_new_tokens=n, greedy=True)["tokens"]
  for seed in (0, 1):
    assert generate.sample(CFG, params, PROMPTS, max_new_tokens=n, top_k=1, temperature=1.0,
                           seed=seed)["tokens"] == greedy
    assert generate.sample(CFG, params, PROMPTS, max_new_tokens=n, top_p=1e-6,
                           seed=seed)["tokens"] == greedy
  assert generate.sample(CFG, params, PROMPTS, max_new_tokens=n,
                         temperature=0.0)["tokens"] == greedy
  # a temperature so small that logits / T overflows float32 is still (nearly) greedy
  assert generate.sample(CFG, params, PROMPTS, max_new_tokens=n, temperature=1e-38,
                         seed=0)["tokens"] == greedy


def test_sampling_is_deterministic_per_seed(params):
  kw = dict(max_new_tokens=N, temperature=1.3, top_p=0.95)
  a = generate.sample(CFG, params, PROMPTS, seed=7, return_logps=True, **kw)
  b = generate.sample(CFG, params, PROMPTS, seed=7, return_logps=True, **kw)
  c = generate.sample(CFG, params, PROMPTS, seed=8, **kw)
  assert a["tokens"] == b["tokens"]
  np.testing.assert_array_equal(a["logps"], b["logps"])
  assert a["tokens"] != c["tokens"]
  assert sum(len(set(t)) for t in a["tokens"]) > 12   # really sampling, not stuck


_jit_filter = jax.jit(lambda x, t, k, p: generate.filter_logits(x / t, k, p))


def _torch_filter(logits, temperature, top_k, top_p):
  """transformers' warpers, in generate's order: temperature -> top-k -> top-p."""
  scores = torch.tensor(np.asarray(logits, np.float32))
  warpers = [logits_process.TemperatureLogitsWarper(temperature)]
  if top_k:
    warpers.append(logits_process.TopKLogitsWarper(top_k))
  if top_p < 1.0:
    warpers.append(logits_process.TopPLogitsWarper(top_p))
  for w in warpers:
    scores = w(None, scores)
  return scores.numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 5, 1.0), (0.7, 0, 0.5), (1.5, 10, 0.8), (1.0, 1, 1.0), (1.0, 0, 1e-6),
    (2.0, 50, 0.9), (1.0, 100, 1.0)])
def test_filter_matches_transformers_warpers(temperature, top_k, top_p):
  logits = np.random.default_rng(0).normal(0, 2.0, (16, 50)).astype(np.float32)
  ours = np.asarray(_jit_filter(jnp.asarray(logits), temperature, top_k, top_p))
  want = _torch_filter(logits, temperature, top_k, top_p)
  np.testing.assert_array_equal(np.isinf(ours), np.isinf(want))
  np.testing.assert_allclose(ours[~np.isinf(ours)], want[~np.isinf(want)], rtol=1e-6)


def test_top_p_one_keeps_the_top_k_whatever_the_float_sum():
  """top_p = 1 keeps every token top_k keeps, even when the f32 cumulative mass reaches 1.0
  after the first (a dominant logit)."""
  out = generate.filter_logits(jnp.asarray([[20.0, 0.0, 0.0, 0.0, -1.0]]), 3, 1.0)
  np.testing.assert_array_equal(np.isfinite(np.asarray(out)), [[True, True, True, True, False]])


def _expected_probs(logits, temperature, top_k, top_p):
  """softmax(logits / T) restricted by top-k then top-p, in plain NumPy (float64)."""
  z = np.asarray(logits, np.float64) / temperature
  order = np.argsort(-z)
  keep = np.zeros(z.shape, bool)
  k = top_k if 0 < top_k < z.size else z.size
  keep[order[:k]] = True
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  p /= p.sum()
  mass = 0.0
  for j, idx in enumerate(order[:k]):   # smallest prefix whose mass reaches top_p
    if j > 0 and mass >= top_p:
      keep[order[j:]] = False
      break
    mass += p[idx]
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (1.7, 0, 1.0), (0.8, 7, 1.0), (1.0, 0, 0.6), (1.3, 20, 0.85)])
def test_first_token_frequencies(params, temperature, top_k, top_p):
  """4000 rows of one prompt in one batch: the first sampled token's histogram against
  softmax(logits / T) restricted by top-k then top-p, computed independently in NumPy."""
  prompt = [3, 1, 4, 1, 5]
  expected = _expected_probs(last_logits(CFG, params, prompt), temperature, top_k, top_p)
  rows = 4000
  # top_p=1 is sent as 1 - 1e-7 (a no-op here) so that every case shares one compiled program.
  out = generate.sample(CFG, params, [prompt] * rows, max_new_tokens=1, temperature=temperature,
                        top_k=top_k, top_p=min(top_p, 1 - 1e-7), seed=11)
  counts = np.bincount([t[0] for t in out["tokens"]], minlength=CFG.vocab_size)
  support = expected > 0
  assert counts[~support].sum() == 0, (counts, expected)
  want = rows * expected[support]
  assert support.sum() >= 5, expected   # the filters leave something to test
  if top_k or top_p < 1:
    assert support.sum() < CFG.vocab_size
  # Cells expecting < 5 counts are pooled, as usual for a chi-square test.
  small = want < 5
  obs = np.append(counts[support][~small], counts[support][small].sum())
  exp = np.append(want[~small], want[small].sum())
  obs, exp = obs[exp > 0], exp[exp > 0]
  chi2, df = np.sum((obs - exp) ** 2 / exp), len(exp) - 1
  # Wilson-Hilferty: (chi2/df)^(1/3) is about normal; z < 3.1 is a p-value above 1e-3.
  z = ((chi2 / df) ** (1 / 3) - (1 - 2 / (9 * df))) / np.sqrt(2 / (9 * df))
  assert z < 3.1, (chi2, df, counts, rows * expected)


# ---------------------------------------------------------------------------------------------
# 5. Sliding window.
# ---------------------------------------------------------------------------------------------


def test_sliding_window_cache_equals_full_forwards():
  cfg = CFG.replace(family="mistral", sliding_window=4)
  params = random_params(cfg, seed=2)
  n = N
  prompts = [[2, 9], [1, 2, 3, 4, 5, 6, 7], [30, 31, 32, 33, 34]]
  assert max(map(len, prompts)) + n > 2 * cfg.sliding_window
  out = generate.sample(cfg, params, prompts, max_new_tokens=n, greedy=True, return_logps=True)
  for r, prompt in enumerate(prompts):
    want, want_logp, _ = naive_greedy(cfg, params, prompt, n)
    assert out["tokens"][r] == want, r
    np.testing.assert_allclose(out["logps"][r], want_logp, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 6. Compilation; sharded params; text.
# ---------------------------------------------------------------------------------------------


def test_compiles_once_per_shape_and_bucket_independence(params):
  fn = generate.decode_fn(CFG, N, True, False)   # what sample(greedy=True) uses
  a = generate.sample(CFG, params, PROMPTS, max_new_tokens=N, greedy=True, return_logps=True)
  size = fn._cache_size()
  assert size >= 1
  b = generate.sample(CFG, params, [[1, 2, 3], [4, 5], [6], list(range(16))], max_new_tokens=N,
                      greedy=True, eos_id=3, pad_id=7)   # same bucket; traced eos / pad
  assert fn._cache_size() == size
  # A prompt long enough for the next length bucket: one more program; the other rows'
  # results do not depend on how much they are padded.
  long_prompt = list(range(40))
  assert generate.prompt_bucket(len(long_prompt)) > generate.prompt_bucket(16)
  c = generate.sample(CFG, params, PROMPTS[:3] + [long_prompt], max_new_tokens=N, greedy=True,
                      return_logps=True)
  assert fn._cache_size() == size + 1
  assert c["tokens"][:3] == a["tokens"][:3] and len(b["tokens"]) == 4
  np.testing.assert_allclose(c["logps"][:3], a["logps"][:3], atol=1e-5)
  assert c["tokens"][3] == naive_greedy(CFG, params, long_prompt, N)[0]
  sampled = generate.decode_fn(CFG, N, False, True)
  sizes = []
  for seed, (t, k, p) in enumerate([(1.0, 5, 1.0), (0.5, 9, 0.5), (2.0, 0, 0.9)]):
    generate.sample(CFG, params, PROMPTS, max_new_tokens=N, temperature=t, top_k=k, top_p=p,
                    seed=seed)   # traced hyperparameters: no recompilation
    sizes.append(sampled._cache_size())
  assert sizes[0] >= 1 and sizes == sizes[:1] * 3


def test_sharded_params_match_plain(params):
  """Params sharded over (data, fsdp, tensor); 3 prompts padded to the 4 batch shards."""
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  rules = sharding.DEFAULT_RULES
  shardings = sharding.tree_shardings(models.logical_axes(CFG), models.abstract_params(CFG),
                                      mesh, rules)
  sharded = jax.device_put(jax.device_get(params), shardings)
  assert any(len(x.sharding.device_set) > 1 for x in jax.tree.leaves(sharded))
  kw = dict(max_new_tokens=N, greedy=True, return_logps=True)
  plain = generate.sample(CFG, params, PROMPTS, **kw)
  on_mesh = generate.sample(CFG, sharded, PROMPTS[:3], mesh=mesh, rules=rules, **kw)
  assert on_mesh["tokens"] == plain["tokens"][:3]
  np.testing.assert_allclose(on_mesh["logps"], plain["logps"][:3], atol=1e-5)


def test_generate_text(hf_pair):
  _, cfg, params = hf_pair   # vocab 97, as the tiny word-level tokenizer
  tok = tiny_tokenizer()
  tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}w50 "
                       "{{ m['content'] }} {% else %}<s> w4 {{ m['content'] }} {% endif %}"
                       "{% endfor %}{% if add_generation_prompt %}w50 {% endif %}")
  prompts = ["w7 w8 w9", [{"role": "user", "content": "w10 w11"}], "w60"]
  out = generate.generate_text(cfg, params, tok, prompts, max_new_tokens=N, greedy=True)
  # The prompt ids are those the training data path makes for the same prompts.
  reply = {str: lambda w: " " + w, list: lambda w: [{"role": "assistant", "content": w}]}
  rows = [{"prompt": p, "chosen": reply[type(p)]("w5"), "rejected": reply[type(p)]("w6")}
          for p in prompts]
  opts = preference.TokenizeOptions(max_length=64, max_prompt_length=32)
  want = [preference.tokenize_rows([r], tok, opts)[0][0].prompt for r in rows]
  assert out["prompt_tokens"] == want
  assert want[:2] == [[1, 7, 8, 9], [1, 4, 10, 11, 50]]
  ids = generate.sample(cfg, params, out["prompt_tokens"], max_new_tokens=N, greedy=True,
                        eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)["tokens"]
  assert out["tokens"] == ids
  assert out["text"] == [tok.decode(t, skip_special_tokens=True) for t in ids]
  assert all(isinstance(t, str) and t for t in out["text"])


def test_bad_arguments(params):
  with pytest.raises(ValueError, match="empty"):
    generate.sample(CFG, params, [[1], []], max_new_tokens=2)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate.sample(CFG, params, [[1]], max_new_tokens=0)
  with pytest.raises(ValueError, match="top_p"):
    generate.sample(CFG, params, [[1]], max_new_tokens=1, top_p=0.0)
  with pytest.raises(ValueError, match="outside"):
    generate.sample(CFG, params, [[CFG.vocab_size]], max_new_tokens=1)
  for t in (float("nan"), float("inf"), -1.0):
    with pytest.raises(ValueError, match="temperature must be finite and >= 0"):
      generate.sample(CFG, params, [[1]], max_new_tokens=1, temperature=t)
  short = CFG.replace(max_position_embeddings=8)   # 6 + 3 > 8: warned, still sampled
  with pytest.warns(UserWarning, match="reach position 9, past the model's "
                    "max_position_embeddings=8"):
    generate.sample(short, params, [[1] * 6], max_new_tokens=3)
