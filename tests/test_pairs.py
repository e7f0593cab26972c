"""dpo_jax.pairs: the rows it writes are rows training reads, scored as training scores them."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import pairs, sharding
from dpo_jax.data import preference
from dpo_jax.models import TINY, core, load


def tiny_model(seed: int) -> pairs.Model:
  cfg = TINY.replace(dtype="float32")
  return pairs.Model(cfg, core.init_params(cfg, seed), load.load_tokenizer(None))


def full_forward_logp(model: pairs.Model, prompt_ids, completion_ids) -> float:
  """Σ log π(y_t | x, y_<t) from one plain forward over prompt + completion."""
  tokens = np.asarray([prompt_ids + completion_ids])
  net = core.merge(core.split(model.cfg)[0], model.params)
  hidden, _ = net(tokens, np.arange(tokens.shape[1])[None], np.ones_like(tokens))
  logp = jax.nn.log_softmax(jnp.einsum("bld,dv->blv", hidden, net.unembedding()), axis=-1)
  n = len(prompt_ids)
  return float(sum(logp[0, n - 1 + t, c] for t, c in enumerate(completion_ids)))


def test_implicit_scores_are_those_of_the_written_text():
  """A response cut at max_new_tokens has no EOS among its sampled ids, but training appends EOS
  to the written completion: the score is that of text + EOS, as dpo_jax.score gives it."""
  policy, ref = tiny_model(0), tiny_model(1)
  tok = policy.tokenizer
  prompts = ["sort 3 1 2:", "add 2 5:"]
  texts = [["1 2 3", "3 2 1", "", "2 1 3"], ["7", "8 "]]   # an odd response out, then a pair
  # sampled ids: the first response stopped at EOS, the others were cut (no EOS)
  responses = [[(tok.encode(t, add_special_tokens=False) + ([tok.eos_token_id] if i == 0 else []),
                 t) for i, t in enumerate(ts)] for ts in texts]
  mesh, rules = sharding.make_mesh(1, 1, 1, jax.devices()[:1]), sharding.DEFAULT_RULES
  for add_bos in (True, False):   # --no_bos: prompts without BOS, as training's data.add_bos
    got = pairs.implicit_scorer(policy, ref, 0.5, mesh, rules, add_bos)(prompts, responses)
    _check_implicit(policy, ref, prompts, texts, got, add_bos)


def _check_implicit(policy, ref, prompts, texts, got, add_bos):
  tok = policy.tokenizer
  for p, ts, scores in zip(prompts, texts, got):
    prompt_ids = preference.encode_prompt(tok, p, add_bos)
    assert (prompt_ids[0] == tok.bos_token_id) == add_bos
    for t, s in zip(ts, scores):
      if not t:
        assert np.isnan(s)   # make_pairs leaves empty responses out
        continue
      ids = tok.encode(t, add_special_tokens=False) + [tok.eos_token_id]
      want = 0.5 * (full_forward_logp(policy, prompt_ids, ids)
                    - full_forward_logp(ref, prompt_ids, ids))
      np.testing.assert_allclose(s, want, rtol=1e-4, atol=1e-5)


def test_no_bos_samples_from_the_prompt_text_alone(monkeypatch):
  """pairs --no_bos (Sampling.add_bos=False) samples from prompts encoded without BOS."""
  from dpo_jax import generate   # noqa: PLC0415
  model, seen, sample = tiny_model(0), [], generate.sample
  monkeypatch.setattr(generate, "sample", lambda cfg, params, ids, **kw: seen.append(ids) or
                      sample(cfg, params, ids, **kw))
  for add_bos in (True, False):
    pairs.sample_responses(model, ["sort 3 1 2:"], pairs.Sampling(
        n=1, max_new_tokens=2, batch_size=1, add_bos=add_bos))
    assert seen.pop() == [preference.encode_prompt(model.tokenizer, "sort 3 1 2:", add_bos)]


def test_a_loaded_model_samples_over_its_mesh_and_stops_as_its_generation_config(tmp_path):
  """Model.load keeps the mesh, so sampling splits the batch over it (the same responses as on
  one device), and the stop ids of the directory's generation_config.json end a response."""
  from dpo_jax.models import hf_io   # noqa: PLC0415
  one = tiny_model(0)
  hf_io.save_hf(str(tmp_path / "m"), one.cfg, one.params, tokenizer=one.tokenizer)
  mesh, rules = sharding.make_mesh(), sharding.DEFAULT_RULES
  assert mesh.devices.size == 8
  model = pairs.Model.load(str(tmp_path / "m"), mesh, rules)
  assert model.mesh is mesh and model.stop_ids() == (one.tokenizer.eos_token_id,)
  sampling = pairs.Sampling(n=3, max_new_tokens=6, batch_size=6, seed=1)
  prompts = ["sort 3 1 2:", "add 2 5:"]
  assert pairs.sample_responses(model, prompts, sampling) == pairs.sample_responses(
      one, prompts, sampling)
  free = pairs.sample_responses(model, prompts, sampling)
  stop = next(t for rs in free for ids, _ in rs for t in ids[1:])   # a token some response emits
  (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": [stop]}))
  model = pairs.Model.load(str(tmp_path / "m"), mesh, rules)
  assert stop in model.stop_ids()
  for rs, free_rs in zip(pairs.sample_responses(model, prompts, sampling), free):
    for (ids, _), (free_ids, _) in zip(rs, free_rs):
      cut = next((i + 1 for i, t in enumerate(free_ids) if t in model.stop_ids()), None)
      assert ids == free_ids[:cut]


def test_sampling_settings_are_checked():
  for key in ("n", "max_new_tokens", "batch_size"):
    with pytest.raises(ValueError, match=f"sampling {key}=0 must be an integer >= 1"):
      pairs.Sampling(**{key: 0})


def test_a_sampled_text_reads_back_as_the_sampled_ids():
  """Training reads a string row as prompt + completion, so a sampled response is written as
  it follows its prompt: with a word-level tokenizer " w1 w2", not "w1 w2" (which would glue
  its first word to the prompt's last). Its ids then come back, EOS appended."""
  from dpo_jax.data import synthetic   # noqa: PLC0415
  tok = synthetic.tokenizer()
  w = synthetic.words()
  prompt = f"{w['topics'][1]} : " + " ".join(w["neutral"][:3])
  ids = tok.convert_tokens_to_ids(w["good"][1][:3])
  prompt_ids = preference.encode_prompt(tok, prompt)
  text = preference.continuation(tok, prompt, prompt_ids, ids)
  assert text == " " + " ".join(w["good"][1][:3])
  (ex,), _ = preference.tokenize_rows([{"prompt": prompt, "completion": text, "label": True}],
                                      tok, preference.TokenizeOptions(64, 32))
  assert ex.prompt == prompt_ids and ex.chosen == ids + [tok.eos_token_id]
  # sample_responses writes its texts so (any sampled ids: a model of random weights)
  cfg = TINY.replace(vocab_size=len(tok))
  model = pairs.Model(cfg, core.init_params(cfg, 0), tok)
  (rs,) = pairs.sample_responses(model, [prompt], pairs.Sampling(
      n=2, max_new_tokens=4, batch_size=2, temperature=1.0, seed=0))
  for sampled, text in rs:
    kept = [t for t in sampled if t != tok.eos_token_id]
    assert text == preference.continuation(tok, prompt, prompt_ids, kept)
    assert not text or text.startswith(" ")


def test_pairs_of_chat_prompts_are_rows_training_reads():
  """After chat messages, the completions are assistant messages (training refuses a string
  after messages)."""
  chat = [{"role": "user", "content": "hi"}]
  rows = pairs.make_pairs([chat, "plain"], [[([1], "a"), ([2], "b")], [([1], "c"), ([2], "d")]],
                          [[1.0, 0.0], [0.0, 1.0]])
  assert rows[0]["chosen"] == [{"role": "assistant", "content": "a"}]
  assert rows[1]["chosen"] == "d" and rows[1]["rejected"] == "c"
  for i, row in enumerate(rows):
    preference.normalize(row, f"row {i}")   # raises DataError on a row training refuses


def test_a_text_sampled_twice_makes_no_duplicate_pair():
  resp = [[([1], "a"), ([2], "b"), ([1], "a"), ([3], ""), ([4], "c")]]
  scores = [[2.0, 1.0, 2.0, 5.0, 0.0]]
  rows = pairs.make_pairs(["p"], resp, scores, rule="margin", margin=0.5)
  got = sorted((r["chosen"], r["rejected"]) for r in rows)
  assert got == [("a", "b"), ("a", "c"), ("b", "c")]
  best = pairs.make_pairs(["p"], resp, scores)
  assert [(r["chosen"], r["rejected"]) for r in best] == [("a", "c")]


def test_prompts_to_sample_from_pass_training_checks(tmp_path):
  """A prompt training would refuse (unknown role, ending with the assistant, a late system
  message) is refused before sampling, naming the row."""
  from dpo_jax import generate
  tok = load.load_tokenizer(None)
  bad = {"unknown role": [{"role": "bot", "content": "x"}],
         "ends with the assistant": [{"role": "user", "content": "a"},
                                     {"role": "assistant", "content": "b"}],
         "late system": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}
  for name, prompt in bad.items():
    with pytest.raises(preference.DataError, match="prompt 1: field 'prompt'"):
      preference.encode_prompts(tok, ["fine", prompt])
    with pytest.raises(preference.DataError, match="prompt 0: field 'prompt'"):
      generate.generate_text(TINY, None, tok, [prompt], max_new_tokens=4)
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "ok"}\n' + json.dumps({"prompt": prompt}) + "\n")
    with pytest.raises(preference.DataError, match=r"prompts.jsonl: row 2: field 'prompt'"):
      pairs.read_prompts(str(path))
  path.write_text('{"prompt": "ok"}\n{"prompt": \n')
  with pytest.raises(preference.DataError, match="row 2: invalid JSON"):
    pairs.read_prompts(str(path))
  path.write_text('{"prompt": "ok"}\n{"prompt": [{"role": "user", "content": "hi"}]}\n')
  assert pairs.read_prompts(str(path)) == ["ok", [{"role": "user", "content": "hi"}]]


def test_reward_model_scores_a_padded_batch_like_one_row_at_a_time(tmp_path):
  """A reward model whose config has no pad_token_id: several responses of different lengths
  in one padded batch (transformers refused the batch) score as each does alone."""
  import torch
  import transformers
  from helpers_hf import BASE, tiny_tokenizer
  torch.manual_seed(0)
  rm = transformers.LlamaForSequenceClassification(
      transformers.LlamaConfig(**BASE, num_labels=1, pad_token_id=None)).eval()
  rm.save_pretrained(tmp_path / "rm")
  tok = tiny_tokenizer()
  tok.save_pretrained(tmp_path / "rm")
  responses = [[([], "w5 w6 w7"), ([], "w8")], [([], "w9 w10")]]
  batched = pairs.reward_model_scorer(str(tmp_path / "rm"))(["w3 w4", "w11"], responses)
  alone = [[pairs.reward_model_scorer(str(tmp_path / "rm"))([p], [[r]])[0][0] for r in rs]
           for p, rs in zip(["w3 w4", "w11"], responses)]
  np.testing.assert_allclose(np.concatenate(batched), np.concatenate(alone), rtol=1e-5,
                             atol=1e-6)


def test_the_kl_estimate_scores_the_sampled_ids():
  """evaluate.ground_truth's KL is a Monte Carlo mean over π's samples, so sequence_logps scores
  the sampled ids as they are: a response cut at max_new_tokens gets no EOS appended."""
  model = tiny_model(0)
  tok = model.tokenizer
  cut = tok.encode("1 2", add_special_tokens=False)
  ended = tok.encode("3", add_special_tokens=False) + [tok.eos_token_id]
  mesh, rules = sharding.make_mesh(1, 1, 1, jax.devices()[:1]), sharding.DEFAULT_RULES
  for add_bos in (True, False):
    got = pairs.sequence_logps(model, ["sort:"], [[(cut, "1 2"), (ended, "3")]], mesh, rules,
                               add_bos)
    prompt_ids = preference.encode_prompt(tok, "sort:", add_bos)
    np.testing.assert_allclose(got[0], [full_forward_logp(model, prompt_ids, ids)
                                        for ids in (cut, ended)], rtol=1e-4, atol=1e-5)
