"""The data path (dpo_jax/data/preference.py): rows -> tokens -> masked, truncated, bucketed
batches.

Token ids are checked against constructions that do not go through preference.py: the byte
tokenizer's ids are rebuilt from its vocabulary and the GPT-2 byte->unicode map, and a second
word-level tokenizer (BOS inside its chat template, different specials) from its word list.
"""
import dataclasses
import functools
import itertools
import json
import os
import re
import tempfile
import threading
import tracemalloc
import types

import datasets
import numpy as np
import pytest
import transformers
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from dpo_jax import writers
from dpo_jax.data import preference as P
from dpo_jax.data.tokenizer import byte_tokenizer

# ---------------------------------------------------------------------------------------------
# Tokenizers and independent encoders
# ---------------------------------------------------------------------------------------------

WORDS = ["hi", "hello", "there", "what", "is", "2", "+", "4", "5", "yes", "no", "the", "answer",
         "be", "nice", "ok", "[", "]", "user", "assistant", "system", "tool", ":", "."]
WORD_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORD_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")


def word_tokenizer(eos=True):
  vocab = {s: i for i, s in enumerate(WORD_SPECIALS + WORDS)}
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(WORD_SPECIALS)
  kw = dict(eos_token="</s>") if eos else {}
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", unk_token="<unk>",
      chat_template=WORD_TEMPLATE, **kw)


def word_ids(text):
  """WordLevel + Whitespace pre-tokenizer, by hand: \\w+ or runs of other non-space chars."""
  vocab = {s: i for i, s in enumerate(WORD_SPECIALS + WORDS)}
  out = []
  for piece in re.findall(r"<s>|</s>|<pad>|<unk>|\w+|[^\w\s]+", text):
    out.append(vocab.get(piece, vocab["<unk>"]))
  return out


def _bytes_to_unicode():
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
        list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


B2U = _bytes_to_unicode()
BYTE = byte_tokenizer()
BYTE_VOCAB = BYTE.get_vocab()
BOS, EOS, PAD = BYTE.bos_token_id, BYTE.eos_token_id, BYTE.pad_token_id


def byte_ids(text):
  """The byte tokenizer by hand: special tokens by name, every other UTF-8 byte one token."""
  out = []
  for piece in re.split(r"(<\|[a-z]+\|>)", text):
    if piece in BYTE_VOCAB and piece.startswith("<|"):
      out.append(BYTE_VOCAB[piece])
    else:
      out += [BYTE_VOCAB[B2U[b]] for b in piece.encode("utf-8")]
  return out


OPTS = P.TokenizeOptions(max_length=64, max_prompt_length=32)


def tok1(row, tokenizer=BYTE, opts=OPTS):
  (ex,), skipped = P.tokenize_rows([row], tokenizer, opts)
  assert skipped == 0
  return ex


def write_jsonl(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


def good(i=0):
  return {"prompt": f"q{i} ", "chosen": f"good {i}", "rejected": f"bad {i}"}


# ---------------------------------------------------------------------------------------------
# Row formats and token-for-token construction
# ---------------------------------------------------------------------------------------------


def test_independent_encoders_agree_with_tokenizers():
  for text in ["hello", "héllo wörld ✓ 😀", "a<|eos|>b", ""]:
    assert byte_ids(text) == BYTE(text, add_special_tokens=False)["input_ids"]
  tok = word_tokenizer()
  for text in ["<s>[user] what is 2 + 2 </s> ", "zebra is nice."]:
    assert word_ids(text) == tok(text, add_special_tokens=False)["input_ids"]


def test_string_row_tokens_and_loss_mask():
  row = {"prompt": "Say é: ", "chosen": "yes ✓", "rejected": "no"}
  ex = tok1(row)
  assert ex.prompt == [BOS] + byte_ids("Say é: ")
  assert ex.chosen == byte_ids("yes ✓") + [EOS]
  assert ex.rejected == byte_ids("no") + [EOS]
  assert ex.label == 1.0
  batch = P.collate([ex], P.default_buckets(64), PAD)
  for i, completion in enumerate([ex.chosen, ex.rejected]):
    n = len(ex.prompt) + len(completion)
    np.testing.assert_array_equal(batch["tokens"][i, :n], ex.prompt + completion)
    # the loss mask covers exactly the completion, EOS included
    np.testing.assert_array_equal(batch["tokens"][i][batch["loss_mask"][i] == 1], completion)
    assert batch["loss_mask"][i].sum() == len(completion)
    assert batch["loss_mask"][i, :len(ex.prompt)].sum() == 0


def test_add_bos_false_and_no_eos_tokenizer():
  ex = tok1(good(), opts=P.TokenizeOptions(64, 32, add_bos=False))
  assert ex.prompt == byte_ids("q0 ")
  tok = word_tokenizer(eos=False)
  ex = tok1({"prompt": "what is 2", "chosen": " yes", "rejected": " no"}, tok)
  assert ex.prompt == [tok.bos_token_id] + word_ids("what is 2")
  assert ex.chosen == word_ids("yes") and ex.rejected == word_ids("no")


def test_conversational_row_byte_template():
  row = {"prompt": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}],
         "chosen": [{"role": "assistant", "content": "hello ✓"}],
         "rejected": [{"role": "assistant", "content": "no"}]}
  ex = tok1(row)
  assert ex.prompt == byte_ids("<|system|>be nice<|eos|><|user|>hi<|eos|><|assistant|>")
  # the completion is the full render minus the prompt render (which ends with the generation
  # prompt '<|assistant|>', so the completion starts at the assistant's content)
  assert ex.chosen == byte_ids("hello ✓<|eos|>")
  assert ex.rejected == byte_ids("no<|eos|>")
  full = BYTE.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
  assert ex.prompt + ex.chosen == BYTE(full, add_special_tokens=False)["input_ids"]


def test_conversational_row_template_with_bos():
  tok = word_tokenizer()
  row = {"prompt": [{"role": "user", "content": "what is 2 + 2"}],
         "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}]}
  ex = tok1(row, tok)
  # the template's BOS, once; add_bos does not add a second one to a chat render
  assert ex.prompt == word_ids("<s>[user] what is 2 + 2 </s> [assistant] ")
  assert ex.prompt.count(tok.bos_token_id) == 1
  assert ex.chosen == word_ids("4 </s> ")
  assert ex.rejected == word_ids("5 </s> ")


def test_conversational_multi_turn_completion():
  row = {"prompt": [{"role": "user", "content": "hi"}],
         "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"},
                    {"role": "assistant", "content": "c"}],
         "rejected": [{"role": "assistant", "content": "x"}]}
  ex = tok1(row)
  assert ex.chosen == byte_ids("a<|eos|><|user|>b<|eos|><|assistant|>c<|eos|>")


def metaspace_tokenizer(template):
  """SentencePiece-like (Llama 2, Mistral): a text's first word gets "▁", so the completion's
  first word encodes otherwise alone than after the prompt."""
  specials = ["<pad>", "<s>", "</s>", "<unk>", "[INST]", "[/INST]", "<think>"]
  vocab = {t: i for i, t in enumerate(specials + ["▁q", "q", "▁It", "It", "▁is", "▁4.", "▁5."])}
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
  tok.add_special_tokens(specials)
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
      unk_token="<unk>", chat_template=template), vocab


INST_TEMPLATE = ("{% for m in messages %}{% if m.role == 'user' %}{{ '[INST]' + m.content + "
                 "'[/INST]' }}{% else %}{{ m.content + eos_token }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("think", [False, True])
def test_a_sequence_is_its_whole_text_encoded(think):
  """Prompt and completion are encoded together, as a model reads them: with a SentencePiece-
  like tokenizer the answer's first word is "It" after "[/INST]" but "▁It" alone. A template
  whose generation prompt ends otherwise than a finished turn (think=True: "<think>", as
  DeepSeek-R1's) splits where the two renderings part."""
  template = INST_TEMPLATE + ("{% if add_generation_prompt %}<think>{% endif %}" if think
                              else "")
  tok, v = metaspace_tokenizer(template)
  row = {"prompt": [{"role": "user", "content": "q"}],
         "chosen": [{"role": "assistant", "content": "It is 4."}],
         "rejected": [{"role": "assistant", "content": "It is 5."}]}
  ex = tok1(row, tok)
  assert ex.prompt == [v["[INST]"], v["q"], v["[/INST]"]]
  assert ex.chosen == [v["It"], v["▁is"], v["▁4."], v["</s>"]]
  assert ex.rejected == [v["It"], v["▁is"], v["▁5."], v["</s>"]]
  assert tok("It is 4.", add_special_tokens=False)["input_ids"][0] == v["▁It"]   # alone
  # strings: prompt + completion is the text (TRL's rule); BOS first, EOS once
  ex = tok1({"prompt": "[INST]q[/INST]", "chosen": "It is 4.", "rejected": "It is 5.</s>"}, tok)
  assert ex.prompt == [v["<s>"], v["[INST]"], v["q"], v["[/INST]"]]
  assert ex.chosen == [v["It"], v["▁is"], v["▁4."], v["</s>"]]
  assert ex.rejected == [v["It"], v["▁is"], v["▁5."], v["</s>"]]
  ex = tok1({"prompt": "<s>[INST]q[/INST]", "chosen": "It is 4.", "rejected": "It is 5."}, tok)
  assert ex.prompt.count(v["<s>"]) == 1
  # a template that renders the prompt's messages otherwise once a completion follows
  tok, _ = metaspace_tokenizer("{% if messages|length > 1 %}[INST]{% endif %}" + INST_TEMPLATE)
  with pytest.raises(P.DataError, match=r"row 1: cannot tokenise: .*renders the prompt's "
                     "messages differently"):
    P.tokenize_rows([row], tok, OPTS, "src")
  # a prompt that leaves no token before the completion is a row error
  with pytest.raises(P.DataError, match=r"src: row 1: field 'prompt': no prompt token precedes"):
    P.tokenize_rows([{"prompt": "hi", "chosen": "there", "rejected": " no"}], word_tokenizer(),
                    P.TokenizeOptions(64, 32, add_bos=False), "src")   # "hithere": one word


def test_implicit_prompt_strings():
  # the space before the first differing word starts the completions (as TRL splits them)
  r = P.normalize({"chosen": "The answer is 4", "rejected": "The answer is 5"}, "w")
  assert (r["prompt"], r["chosen"], r["rejected"]) == ("The answer is", " 4", " 5")
  # cut back to a whitespace boundary: no word is split
  r = P.normalize({"chosen": "I like apples", "rejected": "I like apricots"}, "w")
  assert (r["prompt"], r["chosen"], r["rejected"]) == ("I like", " apples", " apricots")
  r = P.normalize({"chosen": "Q: hi\nA: yes", "rejected": "Q: hi\nA: yes please"}, "w")
  assert (r["prompt"], r["chosen"], r["rejected"]) == ("Q: hi\nA:", " yes", " yes please")
  r = P.normalize({"chosen": "Q: hi\nyes", "rejected": "Q: hi\nno"}, "w")   # a newline stays
  assert (r["prompt"], r["chosen"], r["rejected"]) == ("Q: hi\n", "yes", "no")
  # prompt: null (a datasets column) is the implicit format too
  r = P.normalize({"prompt": None, "chosen": "a b", "rejected": "a c"}, "w")
  assert r["prompt"] == "a"
  with pytest.raises(P.DataError, match=r"w: field 'prompt' is missing.*no common prefix"):
    P.normalize({"chosen": "abc", "rejected": "abd"}, "w")
  ex = tok1({"chosen": "The answer is 4", "rejected": "The answer is 5"})
  assert ex.prompt == [BOS] + byte_ids("The answer is")
  assert ex.chosen == byte_ids(" 4") + [EOS]


def test_implicit_prompt_messages():
  u1, a1 = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
  u2 = {"role": "user", "content": "2+2?"}
  c, r_ = {"role": "assistant", "content": "4"}, {"role": "assistant", "content": "5"}
  r = P.normalize({"chosen": [u1, a1, u2, c], "rejected": [u1, a1, u2, r_]}, "w")
  assert r["conversational"]
  assert r["prompt"] == [u1, a1, u2] and r["chosen"] == [c] and r["rejected"] == [r_]
  ex = tok1({"chosen": [u1, a1, u2, c], "rejected": [u1, a1, u2, r_]})
  explicit = tok1({"prompt": [u1, a1, u2], "chosen": [c], "rejected": [r_]})
  assert ex == explicit
  # the shared messages ending with the assistant is a prompt ending with the assistant
  with pytest.raises(P.DataError, match="last prompt message is from the assistant"):
    P.normalize({"chosen": [u1, a1, {"role": "user", "content": "x"}, c],
                 "rejected": [u1, a1, u2, r_]}, "w")


def test_unpaired_rows():
  rows = [{"prompt": "p0 ", "completion": "yes", "label": True},
          {"prompt": "p1 ", "completion": "no", "label": False},
          {"prompt": [{"role": "user", "content": "hi"}],
           "completion": [{"role": "assistant", "content": "ok"}], "label": np.bool_(True)}]
  exs, _ = P.tokenize_rows(rows, BYTE, OPTS)
  assert [e.label for e in exs] == [1.0, 0.0, 1.0]
  assert all(e.rejected is None for e in exs)
  assert exs[0].prompt == [BOS] + byte_ids("p0 ") and exs[0].chosen == byte_ids("yes") + [EOS]
  assert exs[2].chosen == byte_ids("ok<|eos|>")


@pytest.mark.parametrize("round_rows", [P.ROUND_ROWS, 1])
def test_paired_and_unpaired_rows_do_not_mix(round_rows):
  """Also when the rows of the other kind come in a later round than the first good row."""
  rows = [good(0), {"prompt": "p", "completion": "c", "label": True}, good(1)]
  with pytest.raises(P.DataError, match=r"<rows>: row 2: a unpaired.*data set of paired"):
    P.tokenize_rows(rows, BYTE, OPTS, round_rows=round_rows)
  exs, skipped = P.tokenize_rows(rows, BYTE, OPTS, on_error="skip", round_rows=round_rows)
  assert skipped == 1 and len(exs) == 2


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------

ROWS = [good(i) for i in range(5)]


def _same(rows):
  return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows] == ROWS


def test_source_jsonl_and_json(tmp_path):
  path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in ROWS])
  name, rows = P.load_rows(path)
  assert name == path and _same(rows)
  # .json holding JSON lines, and .json holding one array; a UTF-8 BOM is tolerated
  path = write_jsonl(tmp_path / "d.json", [json.dumps(r) for r in ROWS])
  assert _same(P.load_rows(path)[1])
  (tmp_path / "a.json").write_text("\ufeff" + json.dumps(ROWS, indent=2), encoding="utf-8")
  assert _same(P.load_rows(str(tmp_path / "a.json"))[1])
  # unicode is read as UTF-8 whatever the locale
  path = write_jsonl(tmp_path / "u.jsonl", [json.dumps({"prompt": "ü ", "chosen": "✓",
                                                         "rejected": "✗"}, ensure_ascii=False)])
  assert P.load_rows(path)[1][0]["chosen"] == "✓"
  # only \n ends a line (JSON strings may hold U+2028 and other unicode line breaks raw)
  path = write_jsonl(tmp_path / "v.jsonl", [json.dumps(good(0)), json.dumps(
      {"prompt": "a\u2028b\x1c ", "chosen": "c", "rejected": "d"}, ensure_ascii=False), "{"])
  source, rows = P.load_rows(path)
  assert rows[1]["prompt"] == "a\u2028b\x1c "
  with pytest.raises(P.DataError, match=r"row 3: invalid JSON"):
    P.tokenize_rows(rows, BYTE, OPTS, source)


def assert_indexed_not_held(path, rows, tmp_path):
  """Loading the file at path (over 6 MB of `rows`) holds and peaks under a tenth of its size in
  traced memory, and its rows are read from the file opened at load: a file renamed over the path
  later is not read."""
  size = os.path.getsize(path)
  tracemalloc.start()
  try:
    _, loaded = P.load_rows(str(path))
    held, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert size > 6_000_000 and held < size / 10 and peak < size / 10, (size, held, peak)
  assert len(loaded) == len(rows) and loaded[2_345] == rows[2_345] and loaded[-1] == rows[-1]
  os.replace(write_jsonl(tmp_path / "other.jsonl", [json.dumps(good(0))] * 3), path)
  assert loaded[7] == rows[7] and loaded.numbers[7] == 8   # the file indexed, still open


def test_jsonl_lines_are_read_when_indexed(tmp_path):
  """A JSONL file is indexed, not held: loading 6.5 MB of lines holds under a tenth of the file
  and peaks under a tenth; its rows are read from the file opened at load (a file renamed over
  the path later is not read); a BOM, CRLF ends, blank and whitespace-only lines are as a text
  reader sees them; a line that is not UTF-8, or that a truncation cut, is an error naming it."""
  rows = [{"prompt": f"q{i} " + "p" * (300 + i % 600), "chosen": f"c{i}", "rejected": f"r{i}"}
          for i in range(10_000)]
  path = write_jsonl(tmp_path / "big.jsonl", [json.dumps(r) for r in rows])
  assert_indexed_not_held(path, rows, tmp_path)

  raw = tmp_path / "odd.jsonl"
  raw.write_bytes(b"\xef\xbb\xbf" + json.dumps(good(0)).encode() + b"\r\n\r\n  \t\n"
                  + json.dumps(good(1)).encode() + b"\n\xe2\x80\x83\n"   # U+2003: blank
                  + b'{"prompt": "\xff"}\n' + json.dumps(good(2)).encode())
  source, odd = P.load_rows(str(raw))
  assert len(odd) == 4 and list(odd.numbers) == [1, 4, 6, 7]
  assert [odd[j] for j in (0, 1, 3)] == [good(0), good(1), good(2)]
  with pytest.raises(P.DataError, match=rf"^{raw}: row 6: not UTF-8 text \(invalid start byte "
                                        rf"at byte 13 of the line\)"):
    P.tokenize_rows(odd, BYTE, OPTS, source)
  assert P.tokenize_rows(odd, BYTE, OPTS, source, on_error="skip")[1] == 1
  with open(raw, "r+b") as f:   # cut in place, after the index was made
    f.truncate(os.path.getsize(raw) - 5)
  assert odd[0] == good(0) and P.tokenize_rows(odd, BYTE, OPTS, source, on_error="skip")[1] == 2
  assert odd[3] == P._BadRow("the file was cut short after it was indexed (53 of 58 bytes of "
                             "the line left)")


def test_a_json_array_is_indexed_not_held(tmp_path):
  """A .json file holding one array is indexed as JSON lines are: 7 MB of elements hold and peak
  under a tenth of the file at load, each element is read from the file opened at load and parsed
  when indexed, and an element that is not an object or not UTF-8 is an error naming it. A .json
  file that is not one array is read as JSON lines."""
  rows = [{"prompt": f"q{i} " + "p" * (300 + i % 600), "chosen": f"c{i} [\\\"{{,\\",
           "rejected": [{"role": "assistant", "content": f"r{i}]}}"}]} for i in range(10_000)]
  path = tmp_path / "big.json"
  path.write_text(json.dumps(rows, indent=1))
  assert_indexed_not_held(path, rows, tmp_path)

  odd = tmp_path / "odd.json"
  odd.write_bytes(b"\xef\xbb\xbf [" + json.dumps(good(0)).encode() + b',\n 7, {"prompt": "\xff"},'
                  + json.dumps(good(2)).encode() + b"]\r\n")
  source, got = P.load_rows(str(odd))
  assert len(got) == 4 and got[0] == good(0) and got[3] == good(2)
  with pytest.raises(P.DataError, match=rf"^{odd}: row 2: expected a JSON object, got int"):
    P.tokenize_rows(got, BYTE, OPTS, source)
  assert got[2] == P._BadRow("not UTF-8 text (invalid start byte at byte 14 of the element)")
  assert P.tokenize_rows(got, BYTE, OPTS, source, on_error="skip")[1] == 2
  broken = tmp_path / "broken.json"   # an element's JSON errors say where in the file
  broken.write_text(json.dumps([good(0), good(1)], indent=2).replace('"chosen"', '"chosen" 1')
                    .replace("[", '["x" "y",', 1))
  source, got = P.load_rows(str(broken))
  assert list(got) == [P._BadRow(f"invalid JSON ({e})") for e in (
      "Extra data at line 1 of the file, column 5 of the element",   # "x" "y": on the "[" line
      "Expecting ':' delimiter at line 4 column 14 of the file",
      "Expecting ':' delimiter at line 9 column 14 of the file")]
  arrays = tmp_path / "arrays.json"   # JSON lines that hold arrays: not one array
  arrays.write_text("[1]\n\n[2, 3]\n")
  source, got = P.load_rows(str(arrays))
  assert list(got.numbers) == [1, 3] and got[1] == P._BadRow("expected a JSON object, got list")
  with pytest.raises(P.DataError, match=rf"^{arrays}: row 1: expected a JSON object, got list"):
    P.tokenize_rows(got, BYTE, OPTS, source)
  nested = tmp_path / "nested.json"   # one object over several lines: named as such
  nested.write_text(json.dumps({"version": 1, "data": [good(0), good(1)]}, indent=2))
  with pytest.raises(P.DataError, match=rf"^{nested}: holds one JSON object \(keys \['version', "
                     r"'data'\]\), not rows.*its 'data' list"):
    P.load_rows(str(nested))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(st.sampled_from('ab"\\[]{},: \n\u00e9\u2028')),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(st.sampled_from('k"\\[]{},'), max_size=3), inner, max_size=3),
    max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_JSON, max_size=5), st.sampled_from([None, 0, 2]), st.booleans(),
       st.sampled_from(["keep", "cut", "drop", "insert"]), st.integers(0, 10**6),
       st.sampled_from('[]{},"\\ a1'))
def test_a_json_array_is_split_where_json_reads_it(value, indent, ascii_only, edit, at, char):
  """The elements found by the indexer are, parsed one by one, what json.loads reads from the
  whole text; a text json.loads refuses (cut, a byte dropped, a byte inserted) is refused by the
  indexer or has an element that fails to parse, so no row is silently wrong."""
  for bad in (b"[}", b'[{"a": 1}}', b'[{"a": 1]', b'["a\\"]', b"[1] 2", b"x[1]", b"[1"):
    assert P._array_spans(bad, 0) is None, bad
  text = json.dumps(value, indent=indent, ensure_ascii=ascii_only).encode()
  at %= len(text) + 1
  text = {"keep": text, "cut": text[:at], "drop": text[:at] + text[at + 1:],
          "insert": text[:at] + char.encode() + text[at:]}[edit]
  try:
    want = json.loads(text)
  except ValueError:
    want = None
  event(f"{edit}: {'an array' if isinstance(want, list) else 'not an array'}")
  spans = P._array_spans(text, 0)
  got = None
  if spans is not None:
    try:
      got = [json.loads(text[a:b]) for a, b in zip(*spans[:2])]
      assert list(spans[2]) == [text[:a].count(b"\n") + 1 for a in spans[0]]
    except ValueError:
      got = None
  assert got == (want if isinstance(want, list) else None)


def test_source_dataset_objects(tmp_path):
  ds = datasets.Dataset.from_list(ROWS)
  name, rows = P.load_rows(ds)
  assert name == "<dataset>" and _same(rows)
  dd = datasets.DatasetDict(train=ds, test=datasets.Dataset.from_list(ROWS[:2]))
  name, rows = P.load_rows(dd, "test")
  assert name == "<dataset>[test]" and len(rows) == 2
  with pytest.raises(P.DataError, match=r"no split 'validation'; splits are \['train', 'test'\]"):
    P.load_rows(dd, "validation")
  name, rows = P.load_rows(ROWS)
  assert name == "<rows>" and rows == ROWS
  name, rows = P.load_rows(ds.to_iterable_dataset())   # no random access: streamed
  assert name == "<dataset>" and not isinstance(rows, list) and _same(list(rows))
  assert _same(list(rows))   # each pass reads the dataset again
  name, rows = P.load_rows(datasets.IterableDatasetDict(test=ds.to_iterable_dataset()), "test")
  assert name == "<dataset>[test]" and _same(list(rows))
  _, once = P.load_rows(iter(ROWS))
  assert P.tokenize_rows(once, BYTE, OPTS) == P.tokenize_rows(ROWS, BYTE, OPTS)
  with pytest.raises(P.DataError, match=r"a one-shot iterator, already read"):
    P.tokenize_rows(once, BYTE, OPTS)


def test_a_process_reads_only_the_rows_it_tokenises(tmp_path, monkeypatch):
  """JSON lines and a JSON array's elements are parsed, and a dataset's rows converted from
  Arrow, when they are indexed: process 1 of 2 reads rows 1, 3, 5 and no other. Indexing behaves
  as a list's."""
  lines = [json.dumps(good(i)) for i in range(6)]
  path = write_jsonl(tmp_path / "d.jsonl", lines)
  (tmp_path / "a.json").write_text("[" + ",".join(lines) + "]")
  datasets.Dataset.from_list([good(i) for i in range(6)]).save_to_disk(str(tmp_path / "ds"))
  parsed, read, parse, getitem = [], [], P._parse_line, datasets.Dataset.__getitem__
  monkeypatch.setattr(P, "_parse_line", lambda line, *a: parsed.append(line) or parse(line, *a))
  monkeypatch.setattr(datasets.Dataset, "__getitem__",
                      lambda self, k: read.append(k) or getitem(self, k))
  for src, seen, want in ((path, parsed, [lines[1], lines[3], lines[5]]),
                          (str(tmp_path / "a.json"), parsed, [lines[1], lines[3], lines[5]]),
                          (str(tmp_path / "ds"), read, [1, 3, 5])):
    source, rows = P.load_rows(src)
    seen.clear()
    numbers = getattr(rows, "numbers", range(1, 7))
    part = P.tokenize_part(rows, BYTE, OPTS, source, numbers, range(1, len(rows), 2))
    assert part.index.tolist() == [1, 3, 5] and seen == want
    assert len(rows) == 6 and _same(rows[:5]) and rows[-1] == rows[5] == good(5)
    assert rows[::-2] == [good(5), good(3), good(1)]
    with pytest.raises(IndexError):
      rows[6]   # noqa: B018


def test_source_save_to_disk(tmp_path):
  ds = datasets.Dataset.from_list(ROWS)
  ds.save_to_disk(str(tmp_path / "ds"))
  assert _same(P.load_rows(tmp_path / "ds")[1])   # os.PathLike too
  datasets.DatasetDict(train=ds, test=ds.select([0])).save_to_disk(str(tmp_path / "dd"))
  name, rows = P.load_rows(str(tmp_path / "dd"), "test")
  assert name.endswith("dd[test]") and len(rows) == 1
  assert _same(P.load_rows(str(tmp_path / "dd"))[1])
  with pytest.raises(P.DataError, match="no split 'nope'"):
    P.load_rows(str(tmp_path / "dd"), "nope")


def test_a_split_asked_of_a_source_without_splits_is_refused(tmp_path):
  """A file, a saved Dataset or a list holds one "train" split: asking it for "test" is an
  error (it would read every row: an eval set that is the training set), unless strict=False
  (a default split the source ignores)."""
  path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in ROWS])
  datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
  datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "d.parquet"))
  for src in (path, str(tmp_path / "ds"), str(tmp_path / "d.parquet"), ROWS,
              datasets.Dataset.from_list(ROWS)):
    assert _same(P.load_rows(src, "train")[1])
    assert _same(P.load_rows(src, "test", strict=False)[1])
    with pytest.raises(P.DataError, match=r"has no splits .*split 'test' was asked of it"):
      P.load_rows(src, "test")


def test_source_load_dataset_directory(tmp_path, monkeypatch):
  """A directory of data files goes through datasets.load_dataset (offline, local)."""
  assert os.environ.get("HF_DATASETS_OFFLINE") == "1"
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
  (tmp_path / "data").mkdir()
  write_jsonl(tmp_path / "data" / "train.jsonl", [json.dumps(r) for r in ROWS])
  write_jsonl(tmp_path / "data" / "test.jsonl", [json.dumps(r) for r in ROWS[:3]])
  name, rows = P.load_rows(str(tmp_path / "data"))
  assert _same(rows)
  assert len(P.load_rows(str(tmp_path / "data"), "test")[1]) == 3
  datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "d.parquet"))
  assert _same(P.load_rows(str(tmp_path / "d.parquet"))[1])
  # streaming=True: the same rows, read when iterated (no Arrow table is built)
  for src, split, n in (("data", "train", 5), ("data", "test", 3), ("d.parquet", "train", 5)):
    _, rows = P.load_rows(str(tmp_path / src), split, streaming=True)
    assert isinstance(rows, P._Stream) and list(rows) == ROWS[:n]


def test_dataset_conversational_rows():
  """datasets unifies message structs (absent keys become None); rendering ignores those."""
  rows = [{"prompt": [{"role": "user", "content": "hi", "name": "bob"}],
           "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]},
          {"prompt": [{"role": "user", "content": "hi"}],
           "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]}]
  _, loaded = P.load_rows(datasets.Dataset.from_list(rows))
  assert loaded[1]["prompt"][0]["name"] is None
  exs, _ = P.tokenize_rows(loaded, BYTE, OPTS)
  assert exs[0] == exs[1]


# ---------------------------------------------------------------------------------------------
# Truncation
# ---------------------------------------------------------------------------------------------


def _lens(prompt_len, completion_len, **kw):
  """A string row whose prompt has prompt_len tokens (BOS included) and completion
  completion_len tokens (EOS included) under the byte tokenizer."""
  return {"prompt": "p" * (prompt_len - 1), "chosen": "c" * (completion_len - 1),
          "rejected": "r" * (completion_len - 1)}


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_prompt_truncation_boundaries(mode):
  opts = P.TokenizeOptions(max_length=20, max_prompt_length=8, truncation_mode=mode)
  full = [BOS] + byte_ids("0123456")   # 8 tokens: exactly the limit, kept whole
  ex = tok1({"prompt": "0123456", "chosen": "a", "rejected": "b"}, opts=opts)
  assert ex.prompt == full
  ex = tok1({"prompt": "01234567", "chosen": "a", "rejected": "b"}, opts=opts)   # one over
  full = [BOS] + byte_ids("01234567")   # keep_end keeps BOS and the last 7
  assert ex.prompt == ([BOS] + full[-7:] if mode == "keep_end" else full[:8])
  assert ex.prompt == ([BOS] + byte_ids("1234567") if mode == "keep_end" else full[:8])
  ex = tok1({"prompt": "0123456789" * 3, "chosen": "a", "rejected": "b"}, opts=opts)
  full = [BOS] + byte_ids("0123456789" * 3)
  assert ex.prompt == ([BOS] + full[-7:] if mode == "keep_end" else full[:8])
  assert ex.chosen == byte_ids("a") + [EOS]


def test_completion_truncation_boundaries():
  opts = P.TokenizeOptions(max_length=20, max_prompt_length=8)
  # prompt 8 tokens -> room 12: a 12-token completion (EOS included) fits exactly
  ex = tok1(_lens(8, 12), opts=opts)
  assert len(ex.prompt) + len(ex.chosen) == 20 and ex.chosen[-1] == EOS
  # one over: cut at the end (the EOS goes)
  ex = tok1(_lens(8, 13), opts=opts)
  assert ex.chosen == byte_ids("c" * 12) and ex.rejected == byte_ids("r" * 12)
  # a truncated prompt leaves room computed from its truncated length
  ex = tok1(_lens(30, 30), opts=opts)
  assert len(ex.prompt) == 8 and len(ex.chosen) == 12
  # chosen and rejected are cut independently
  ex = tok1({"prompt": "p" * 7, "chosen": "c" * 3, "rejected": "r" * 40}, opts=opts)
  assert ex.chosen == byte_ids("ccc") + [EOS] and ex.rejected == byte_ids("r" * 12)
  for e in [ex]:
    assert len(e.prompt) + max(len(e.chosen), len(e.rejected)) <= opts.max_length


def test_truncate_function_and_no_completion_left():
  opts = P.TokenizeOptions(max_length=6, max_prompt_length=3)
  assert P.truncate([1, 2, 3, 4], [5, 6, 7, 8], opts, "w", "chosen") == ([2, 3, 4], [5, 6, 7])
  keep_start = P.TokenizeOptions(6, 3, "keep_start")
  assert P.truncate([1, 2, 3, 4], [5], keep_start, "w", "chosen") == ([1, 2, 3], [5])
  # keep_end keeps a BOS (head=1) and the last ids; keep_start has it anyway; a one-id prompt
  # keeps the last id
  assert P.truncate([1, 2, 3, 4], [5], opts, "w", "chosen", head=1) == ([1, 3, 4], [5])
  assert P.truncate([1, 2, 3, 4], [5], keep_start, "w", "chosen", head=1) == ([1, 2, 3], [5])
  one = P.TokenizeOptions(6, 1)
  assert P.truncate([1, 2, 3], [5], one, "w", "chosen", head=1) == ([3], [5])
  assert P.truncate([1, 2, 3], [5], opts, "w", "chosen", head=1) == ([1, 2, 3], [5])
  with pytest.raises(P.DataError, match=r"w: field 'rejected': no completion token fits"):
    P.truncate([1, 2], [], opts, "w", "rejected")
  with pytest.raises(P.DataError, match=r"w: field 'chosen': no completion token fits"):
    P.truncate([1, 2, 3, 4], [5], P.TokenizeOptions(4, 4), "w", "chosen")
  # a completion that tokenises to nothing (no EOS to append) is a row error naming the field
  tok = word_tokenizer(eos=False)
  rows = [{"prompt": "hi", "chosen": " yes", "rejected": " no"},
          {"prompt": "hi", "chosen": " yes", "rejected": "   "}]
  with pytest.raises(P.DataError, match=r"src: row 2: field 'rejected': no completion token"):
    P.tokenize_rows(rows, tok, OPTS, "src")


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_truncation_is_recorded_per_example_and_reported(tmp_path, mode):
  """Each example records whether truncation cut its prompt, chosen or rejected ids, counted
  here from the texts' lengths (BOS + bytes, bytes + EOS); the flags survive rounds, the file
  of ids, the cache, take and concat, and truncation_note counts them."""
  opts = P.TokenizeOptions(max_length=20, max_prompt_length=8, truncation_mode=mode)
  shapes = [(7, 12, 12), (8, 12, 12), (8, 13, 3), (30, 3, 30), (3, 40, 40), (2, 2, 18)]
  rows = [{"prompt": "p" * (lp - 1), "chosen": "c" * (lc - 1), "rejected": "r" * (lr - 1)}
          for lp, lc, lr in shapes]
  want = []
  for lp, lc, lr in shapes:
    room = opts.max_length - min(lp, 8)
    want.append((lp > 8) * P.CUT_PROMPT + (lc > room) * P.CUT_CHOSEN + (lr > room) * P.CUT_REJECTED)
  assert want == [0, 0, 2, 5, 6, 0]
  exs, _ = P.tokenize_rows(rows, BYTE, opts, round_rows=2, spill_dir=str(tmp_path))
  assert exs.cut.tolist() == want == [e.cut for e in exs]
  assert [tok1(r, opts=opts).cut for r in rows] == want
  cache = str(tmp_path / "cache")
  for _ in range(2):   # written, then read back
    cached, _ = P.tokenize_cached(cache, rows, BYTE, opts)
    assert cached == exs and cached.cut.tolist() == want
  both = P.Examples.concat([exs.take([3, 0]), exs[4:]])
  assert both.cut.tolist() == [5, 0, 6, 0]
  assert P.truncation_note(exs, opts, "src") == (
      f"src: truncation cut 3 of 6 examples (max_length=20, max_prompt_length=8, {mode}): "
      "the prompt of 1, the chosen completion of 2, the rejected completion of 2")
  assert P.truncation_note(exs.take([0, 1, 5]), opts, "src") is None
  # completions that differ only past the cut leave a pair without a preference: counted
  same = [{"prompt": "p", "chosen": "c" * 30 + "x", "rejected": "c" * 30 + "y"}, rows[0]]
  exs = P.tokenize_rows(same, BYTE, opts)[0]
  assert exs.cut.tolist() == [P.CUT_CHOSEN | P.CUT_REJECTED | P.CUT_SAME, 0]
  assert exs[0].chosen == exs[0].rejected
  assert P.truncation_note(exs, opts, "src").endswith(
      "the chosen completion of 1, the rejected completion of 1, and left chosen and rejected "
      "the same in 1")
  unpaired = [{"prompt": "p" * 3, "completion": "c" * n, "label": True} for n in (5, 30, 30)]
  assert P.truncation_note(P.tokenize_rows(unpaired, BYTE, opts)[0], opts, "u") == (
      f"u: truncation cut 2 of 3 examples (max_length=20, max_prompt_length=8, {mode}): "
      "the completion of 2")


def test_bad_options():
  with pytest.raises(ValueError, match="max_prompt_length=64 must be smaller"):
    P.tokenize_rows([good()], BYTE, P.TokenizeOptions(64, 64))
  with pytest.raises(ValueError, match="max_prompt_length=0 must be >= 1"):
    P.tokenize_rows([good()], BYTE, P.TokenizeOptions(64, 0))
  with pytest.raises(ValueError, match="truncation_mode"):   # even when nothing is truncated
    P.tokenize_rows([good()], BYTE, P.TokenizeOptions(64, 32, "keep_middle"))
  with pytest.raises(ValueError, match="on_error"):
    P.tokenize_rows([good()], BYTE, OPTS, on_error="ignore")


# ---------------------------------------------------------------------------------------------
# Buckets and collate
# ---------------------------------------------------------------------------------------------


def test_default_buckets():
  assert P.default_buckets(1024) == (32, 64, 128, 256, 512, 1024)
  assert P.default_buckets(128) == (32, 64, 128)
  assert P.default_buckets(100) == (32, 64, 100)
  assert P.default_buckets(32) == (32,)
  assert P.default_buckets(20) == (20,)
  assert P.default_buckets(100, smallest=8) == (8, 16, 32, 64, 100)
  assert P.bucket_length(1, (32, 64)) == 32
  assert P.bucket_length(32, (32, 64)) == 32
  assert P.bucket_length(33, (32, 64)) == 64
  assert P.bucket_length(33, (64, 48, 32)) == 48   # config order does not matter
  with pytest.raises(ValueError, match="exceeds the largest bucket 64"):
    P.bucket_length(65, (32, 64))


def _ex(p, c, r=None, label=1.0):
  return P.Tokenized(list(p), list(c), None if r is None else list(r), label)


def test_collate_layout():
  exs = [_ex([1, 2], [3], [4, 5]), _ex([6], [7, 8, 9, 16], [10]), _ex([11, 12, 13], [14], [15])]
  b = P.collate(exs, (4, 8), pad_id=0, valid=[True, True, False])
  assert b["tokens"].shape == (6, 8)   # the longest sequence has 5 tokens
  seqs = [e.prompt + e.chosen for e in exs] + [e.prompt + e.rejected for e in exs]
  plens = [len(e.prompt) for e in exs] * 2
  for i, (s, pl) in enumerate(zip(seqs, plens)):
    n = len(s)
    np.testing.assert_array_equal(b["tokens"][i, :n], s)
    np.testing.assert_array_equal(b["tokens"][i, n:], 0)
    np.testing.assert_array_equal(b["positions"][i, :n], np.arange(n))
    np.testing.assert_array_equal(b["positions"][i, n:], 0)
    np.testing.assert_array_equal(b["segment_ids"][i], [1] * n + [0] * (8 - n))
    np.testing.assert_array_equal(b["loss_mask"][i], [0] * pl + [1] * (n - pl) + [0] * (8 - n))
    np.testing.assert_array_equal(b["seq_index"][i], i)
  np.testing.assert_array_equal(b["valid"], [1, 1, 0])
  np.testing.assert_array_equal(b["label"], [1, 1, 1])
  assert b["tokens"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
  assert b["valid"].shape == b["label"].shape == (3,)


def test_collate_bucket_choice():
  assert P.collate([_ex([1] * 4, [2] * 4, [3])], (4, 8, 16), 0)["tokens"].shape == (2, 8)
  assert P.collate([_ex([1] * 4, [2] * 5, [3])], (4, 8, 16), 0)["tokens"].shape == (2, 16)
  assert P.collate([_ex([1], [2], [3, 3, 3])], (4, 8, 16), 0)["tokens"].shape == (2, 4)


def test_collate_unpaired_mismatched_half():
  exs = [_ex([1], [10, 11], label=1.0), _ex([2, 2], [20], label=0.0), _ex([3], [30], label=1.0)]
  b = P.collate(exs, (8,), pad_id=9)
  for i in range(3):
    mismatched = exs[i].prompt + exs[(i + 1) % 3].chosen
    n = len(mismatched)
    np.testing.assert_array_equal(b["tokens"][3 + i, :n], mismatched)
    assert b["loss_mask"][3 + i].sum() == len(exs[(i + 1) % 3].chosen)
  np.testing.assert_array_equal(b["label"], [1, 0, 1])


def test_collate_unpaired_mismatched_fits_largest_bucket():
  """x_i + y_{i+1} can exceed max_length when prompt_i is longer than prompt_{i+1}."""
  exs = [_ex([1] * 10, [2] * 2), _ex([3] * 2, [4] * 10)]   # each 12 = max_length
  b = P.collate(exs, (8, 12), pad_id=0)
  assert b["tokens"].shape == (4, 12)
  np.testing.assert_array_equal(b["tokens"][2], [1] * 10 + [4] * 2)
  assert b["loss_mask"][2].sum() == 2


def _random_examples(rng, n, max_length=64, max_prompt=24, paired=True):
  """Lengths spread over the buckets: each example's total is at most one of a few sizes."""
  exs = []
  for _ in range(n):
    total = int(rng.choice([6, 14, 30, max_length]))
    p = int(rng.integers(1, min(max_prompt, total - 1) + 1))
    c, r = rng.integers(1, total - p + 1, size=2)
    exs.append(_ex(rng.integers(3, 200, p), rng.integers(3, 200, c),
                   rng.integers(3, 200, r) if paired else None,
                   1.0 if paired else float(rng.integers(0, 2))))
  return exs


def _check_batch(batch, buckets, pad_id, b):
  r, length = batch["tokens"].shape
  assert r == 2 * b and length in buckets
  for key in ("tokens", "positions", "segment_ids", "loss_mask", "seq_index"):
    assert batch[key].shape == (r, length)
  pad = batch["segment_ids"] == 0
  assert (batch["loss_mask"][pad] == 0).all()
  assert (batch["tokens"][pad] == pad_id).all()
  assert (batch["loss_mask"] <= batch["segment_ids"]).all()
  assert (batch["loss_mask"].sum(1) >= 1).all()
  n = batch["segment_ids"].sum(1)
  for i in range(r):   # real tokens first, then padding; positions count the real ones
    assert (batch["segment_ids"][i, :n[i]] == 1).all()
    np.testing.assert_array_equal(batch["positions"][i, :n[i]], np.arange(n[i]))
  np.testing.assert_array_equal(batch["seq_index"], np.arange(r)[:, None].repeat(length, 1))


@pytest.mark.parametrize("paired", [True, False])
def test_batches_shapes_are_buckets(paired):
  rng = np.random.default_rng(0)
  buckets = P.default_buckets(64, smallest=8)
  exs = _random_examples(rng, 40, paired=paired)
  data = P.Batches(exs, 2, seed=1, buckets=buckets, pad_id=PAD)
  shapes = set()
  for step in range(150):
    batch = data(step)
    _check_batch(batch, buckets, PAD, 2)
    shapes.add(batch["tokens"].shape)
  assert {s[1] for s in shapes} <= set(buckets)
  assert len(shapes) <= len(buckets) and len(shapes) >= 2


def test_batches_reject_examples_beyond_largest_bucket():
  with pytest.raises(ValueError, match="does not fit the largest bucket 8"):
    P.Batches([_ex([1] * 5, [2] * 5, [3])], 1, 0, (4, 8), 0)


# ---------------------------------------------------------------------------------------------
# Batches: determinism, epochs; eval batches
# ---------------------------------------------------------------------------------------------


def _tagged(n):
  """Examples whose first prompt token is their index."""
  return [_ex([i], [1000 + i], [2000 + i]) for i in range(n)]


def test_batches_pure_function_of_seed_and_step():
  exs = _tagged(10)
  a = P.Batches(exs, 3, seed=7, buckets=(4,), pad_id=0)
  b = P.Batches(exs, 3, seed=7, buckets=(4,), pad_id=0)
  forward = [a(s)["tokens"] for s in range(12)]
  for s in [11, 3, 0, 7, 7, 5, 11]:   # any access order, e.g. after a resume
    np.testing.assert_array_equal(b(s)["tokens"], forward[s])
  assert a.indices(20) == P.Batches(exs, 3, seed=7, buckets=(4,), pad_id=0).indices(20)
  c = P.Batches(exs, 3, seed=8, buckets=(4,), pad_id=0)
  assert [a.indices(s) for s in range(4)] != [c.indices(s) for s in range(4)]
  assert P.Batches(exs, 3, 0, (4,), 0, shuffle=False).indices(3) == [9, 0, 1]
  # the chosen row of each pair carries the example: tokens[i, 0] is its index
  np.testing.assert_array_equal(a(2)["tokens"][:3, 0], a.indices(2))
  np.testing.assert_array_equal(a(2)["tokens"][3:, 1], np.array(a.indices(2)) + 2000)


@pytest.mark.parametrize("n,bs", [(10, 3), (7, 7), (9, 4), (5, 1)])
def test_batches_every_example_once_per_epoch(n, bs):
  data = P.Batches(_tagged(n), bs, seed=3, buckets=(4,), pad_id=0)
  n_epochs = 4
  steps = -(-n * n_epochs // bs) + 1
  stream = [i for s in range(steps) for i in data.indices(s)]
  epochs = [stream[e * n:(e + 1) * n] for e in range(n_epochs)]
  for e in epochs:
    assert sorted(e) == list(range(n))
  if n > 2:
    assert len({tuple(e) for e in epochs}) > 1   # reshuffled each epoch
  assert data.epoch(steps) == steps * bs / n


def test_batches_epoch_boundary_inside_batch():
  n, bs = 10, 4
  data = P.Batches(_tagged(n), bs, seed=0, buckets=(4,), pad_id=0)
  e0 = np.random.default_rng([0, 0]).permutation(n)
  e1 = np.random.default_rng([0, 1]).permutation(n)
  assert data.indices(2) == [int(e0[8]), int(e0[9]), int(e1[0]), int(e1[1])]
  fresh = P.Batches(_tagged(n), bs, seed=0, buckets=(4,), pad_id=0)
  assert fresh.indices(2) == data.indices(2)   # no history needed


def test_batches_errors():
  with pytest.raises(ValueError, match="batch_size=4 exceeds the 3 examples"):
    P.Batches(_tagged(3), 4, 0, (4,), 0)
  with pytest.raises(ValueError, match="batch_size=0"):
    P.Batches(_tagged(3), 0, 0, (4,), 0)


@pytest.mark.parametrize("n,bs", [(7, 3), (6, 3), (1, 4), (5, 8)])
def test_eval_batches_cover_every_example_once(n, bs):
  exs = _tagged(n)
  batches = list(P.eval_batches(exs, bs, (4,), pad_id=0))
  assert len(batches) == -(-n // bs)
  seen = []
  for b in batches:
    assert b["valid"].shape == (bs,) and b["tokens"].shape == (2 * bs, 4)
    seen += [int(t) for t, v in zip(b["tokens"][:bs, 0], b["valid"]) if v]
  assert seen == list(range(n))
  valid = np.concatenate([b["valid"] for b in batches])
  np.testing.assert_array_equal(valid, [1] * n + [0] * (len(batches) * bs - n))


# ---------------------------------------------------------------------------------------------
# Errors: source, row number, field
# ---------------------------------------------------------------------------------------------

MSG = lambda role, content: {"role": role, "content": content}   # noqa: E731
CHAT_OK = {"prompt": [MSG("user", "hi")], "chosen": [MSG("assistant", "a")],
           "rejected": [MSG("assistant", "b")]}

BAD_ROWS = {
    "empty_prompt": ({"chosen": "a", "rejected": "a b", "prompt": ""},
        r"field 'prompt' is missing or empty"),
    "missing_prompt": ({"completion": "c", "label": True}, r"field 'prompt' is missing or empty"),
    "empty_chat_prompt": ({**CHAT_OK, "prompt": []}, r"field 'prompt' is missing or empty"),
    "missing_chosen": ({"prompt": "p", "rejected": "b"}, r"field 'chosen' is missing or empty"),
    "empty_rejected": ({"prompt": "p", "chosen": "a", "rejected": ""},
        r"field 'rejected' is missing or empty"),
    "null_chosen": ({"prompt": "p", "chosen": None, "rejected": "b"}, r"field 'chosen' is missing"),
    "int_prompt": ({"prompt": 5, "chosen": "a", "rejected": "b"},
        r"field 'prompt' must be a string or a list of messages.*got int"),
    "int_chosen": ({"prompt": "p", "chosen": 5, "rejected": "b"},
        r"field 'chosen' must be a string, got int"),
    "list_rejected_for_string_prompt": ({"prompt": "p", "chosen": "a", "rejected": ["b"]},
        r"field 'rejected' must be a string, got list"),
    "string_chosen_for_chat_prompt": ({**CHAT_OK, "chosen": "a"},
        r"field 'chosen' must be a list of messages"),
    "dict_prompt": ({"prompt": {"a": 1}, "chosen": "a", "rejected": "b"},
        r"field 'prompt' must be a string or a list"),
    "bad_role": ({**CHAT_OK, "prompt": [MSG("bot", "hi")]},
        r"field 'prompt' message 0: bad role 'bot'"),
    "missing_role": ({**CHAT_OK, "chosen": [{"content": "a"}]},
        r"field 'chosen' message 0: bad role None"),
    "content_not_string": ({**CHAT_OK, "rejected": [MSG("assistant", 3)]},
        r"field 'rejected' message 0: content must be a string"),
    "message_not_object": ({**CHAT_OK, "prompt": ["hi"]},
        r"field 'prompt' must be a list of messages"),
    "system_not_first": ({**CHAT_OK, "prompt": [MSG("user", "hi"), MSG("system", "s"),
                                                 MSG("user", "x")]},
        r"field 'prompt': a system message may only come first"),
    "system_in_completion": ({**CHAT_OK, "chosen": [MSG("system", "s")]},
        r"field 'chosen': a system message may only come first"),
    "prompt_ends_with_assistant": ({**CHAT_OK, "prompt": [MSG("user", "hi"),
                                                           MSG("assistant", "x")]},
        r"field 'prompt': the last prompt message is from the assistant"),
    "completion_starts_with_user": ({**CHAT_OK, "rejected": [MSG("user", "b")]},
        r"field 'rejected': the completion must start with an assistant"),
    "identical": ({"prompt": "p", "chosen": "same", "rejected": "same"},
        r"fields 'chosen' and 'rejected' are identical"),
    "identical_implicit": ({"chosen": "same", "rejected": "same"},
        r"fields 'chosen' and 'rejected' are identical"),
    "identical_chat": ({**CHAT_OK, "rejected": CHAT_OK["chosen"]},
        r"fields 'chosen' and 'rejected' are identical"),
    "label_not_bool": ({"prompt": "p", "completion": "c", "label": 1},
        r"field 'label' must be a boolean, got 1"),
    "label_string": ({"prompt": "p", "completion": "c", "label": "true"},
        r"field 'label' must be a boolean, got 'true'"),
    "label_null": ({"prompt": "p", "completion": "c", "label": None},
        r"field 'label' must be a boolean, got None"),
    "completion_empty": ({"prompt": "p", "completion": "", "label": True},
        r"field 'completion' is missing or empty"),
    "lone_surrogate": ({"prompt": "p", "chosen": "a\ud800", "rejected": "b"},
        r"field 'chosen' is not valid unicode"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_jsonl_line_numbers(tmp_path, case):
  row, pattern = BAD_ROWS[case]
  # line 1 good, line 2 blank, line 3 good, line 4 whitespace only, line 5 bad, line 6 good
  path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(good(0)), "", json.dumps(good(1)), "  ",
                                            json.dumps(row), json.dumps(good(2))])
  source, rows = P.load_rows(path)
  assert len(rows) == 4
  with pytest.raises(P.DataError) as e:
    P.tokenize_rows(rows, BYTE, OPTS, source)
  assert str(e.value).startswith(f"{path}: row 5: "), str(e.value)
  assert e.value.args[0] == str(e.value)
  assert re.search(pattern, str(e.value)), str(e.value)
  exs, skipped = P.tokenize_rows(rows, BYTE, OPTS, source, on_error="skip")
  assert skipped == 1 and len(exs) == 3
  # in a list of rows, or a datasets.Dataset-like list, the number is the index + 1
  with pytest.raises(P.DataError, match=r"^src: row 2: "):
    P.tokenize_rows([good(0), row], BYTE, OPTS, "src")


@pytest.mark.parametrize("line,pattern", [
    ('{"prompt": "p", "chosen": "a"', r"invalid JSON"),
    ("{'prompt': 'p'}", r"invalid JSON"),
    ('["p", "a", "b"]', r"expected a JSON object, got list"),
    ('"just a string"', r"expected a JSON object, got str"),
    ("42", r"expected a JSON object, got int"),
    ("null", r"expected a JSON object, got NoneType"),
])
def test_unreadable_jsonl_lines(tmp_path, line, pattern):
  path = write_jsonl(tmp_path / "d.jsonl", ["", json.dumps(good(0)), line, json.dumps(good(1))])
  source, rows = P.load_rows(path)   # per-row problems surface in tokenize_rows
  with pytest.raises(P.DataError, match=rf"^{path}: row 3: {pattern}"):
    P.tokenize_rows(rows, BYTE, OPTS, source)
  exs, skipped = P.tokenize_rows(rows, BYTE, OPTS, source, on_error="skip")
  assert skipped == 1 and len(exs) == 2


def test_row_not_an_object_in_list():
  with pytest.raises(P.DataError, match=r"^<rows>: row 2: expected an object.*got str"):
    P.tokenize_rows([good(), "not a row"], BYTE, OPTS, "<rows>")
  with pytest.raises(P.DataError, match=r"^where: expected an object"):
    P.normalize(["a"], "where")


def test_skip_counts_and_all_bad(tmp_path):
  lines = [json.dumps(good(0)), "{bad", json.dumps(BAD_ROWS["identical"][0]), "",
           json.dumps(good(1)), json.dumps(BAD_ROWS["label_not_bool"][0]), "[]"]
  source, rows = P.load_rows(write_jsonl(tmp_path / "d.jsonl", lines))
  exs, skipped = P.tokenize_rows(rows, BYTE, OPTS, source, on_error="skip")
  assert skipped == 4 and [e.chosen for e in exs] == [byte_ids("good 0") + [EOS],
                                                      byte_ids("good 1") + [EOS]]
  with pytest.raises(P.DataError, match=r"no usable rows \(2 skipped\)"):
    P.tokenize_rows([{}, []], BYTE, OPTS, on_error="skip")
  with pytest.raises(P.DataError, match=r"no usable rows \(0 skipped\)"):
    P.tokenize_rows([], BYTE, OPTS)


def test_template_failure_is_a_row_error():
  tok = word_tokenizer()
  tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}"
                       "{{ raise_exception('no tools') }}{% endif %}{{ m['content'] }}"
                       "{% endfor %}")
  row = {**CHAT_OK, "prompt": [MSG("user", "hi"), MSG("tool", "x")]}
  with pytest.raises(P.DataError, match=r"^s: row 1: cannot tokenise: .*no tools"):
    P.tokenize_rows([row], tok, OPTS, "s")


def test_a_prompt_for_sampling_is_encoded_as_training_encodes_it():
  """encode_prompt (sampling, pairs) and tokenize_rows share the rendering and special tokens."""
  chat = {**CHAT_OK, "prompt": [MSG("system", "be brief"), MSG("user", "hi")]}
  for row in (good(3), chat):
    assert P.encode_prompt(BYTE, row["prompt"]) == tok1(row).prompt
  assert P.encode_prompt(BYTE, "q3 ") == [BOS] + byte_ids("q3 ")
  assert P.encode_prompt(BYTE, "q3 ", add_bos=False) == byte_ids("q3 ")
  assert tok1(good(3), opts=dataclasses.replace(OPTS, add_bos=False)).prompt == byte_ids("q3 ")
  prompts = [good(3)["prompt"], chat["prompt"], "q4 "]
  tok = CountingTokenizer(BYTE)
  assert P.encode_prompts(tok, prompts) == [tok1(good(3)).prompt, tok1(chat).prompt,
                                           [BOS] + byte_ids("q4 ")]
  assert tok.calls == [3]   # every prompt in one call


class CountingTokenizer:
  """BYTE, counting the texts of each encoding call and failing on any text with "BOOM"."""

  def __init__(self, tok):
    self.tok, self.calls = tok, []

  def __getattr__(self, name):
    return getattr(self.tok, name)

  def __call__(self, texts, **kwargs):
    self.calls.append(len(texts))
    if any("BOOM" in t for t in texts):
      raise RuntimeError("BOOM")
    return self.tok(texts, **kwargs)


def test_rows_are_encoded_in_batches_and_a_failing_row_is_named(monkeypatch):
  """A block of rows is encoded in one call; when that call fails, each row is encoded alone, so
  the error names the row and the other rows are kept, as if the bad row were not there."""
  rows = [good(i) for i in range(5)] + [CHAT_OK]
  tok = CountingTokenizer(BYTE)
  got = P.tokenize_rows(rows, tok, OPTS, "s")
  assert tok.calls == [6 * 3] and got == P.tokenize_rows(rows, BYTE, OPTS, "s")
  assert got[0][0].chosen == byte_ids("good 0") + [EOS]   # the ids alone, then EOS
  monkeypatch.setattr(P, "ENCODE_BLOCK", 4)
  tok.calls.clear()
  assert P.tokenize_rows(rows, tok, OPTS, "s") == got and tok.calls == [4 * 3, 2 * 3]
  rows[2] = {**good(2), "rejected": "bad BOOM"}
  tok.calls.clear()
  with pytest.raises(P.DataError, match=r"^s: row 3: cannot tokenise: RuntimeError: BOOM$"):
    P.tokenize_rows(rows, tok, OPTS, "s")
  assert tok.calls == [12, 3, 3, 3, 3, 6]   # the block fails: its 4 rows alone; then block 2
  examples, skipped = P.tokenize_rows(rows, tok, OPTS, "s", on_error="skip")
  assert skipped == 1 and examples == list(got[0][:2]) + list(got[0][3:])


# ---------------------------------------------------------------------------------------------
# Fuzz: any JSON-like row is either a valid batch or a DataError
# ---------------------------------------------------------------------------------------------

_text = st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "hi there", "<|eos|>", "\x00",
                                                         "😀 é", "\ud800", "answer is 4"]))
_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), _text),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["role", "content", "x"]), inner,
                                            max_size=3)),
    max_leaves=6)
_message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(P.ROLES), _json), "content": st.one_of(_text, _json)})
_messages = st.lists(st.one_of(_message, _json), max_size=3)
_value = st.one_of(_text, _messages, _json)
_chat = lambda role: st.lists(st.fixed_dictionaries(   # noqa: E731
    {"role": st.sampled_from([role, role, "user", "system"]), "content": _text}),
    min_size=1, max_size=2)
_row = st.one_of(
    st.fixed_dictionaries({"prompt": _text, "chosen": _text, "rejected": _text}),
    st.fixed_dictionaries({"prompt": _chat("user"), "chosen": _chat("assistant"),
                           "rejected": _chat("assistant")}),
    st.fixed_dictionaries({"prompt": _text, "completion": _text, "label": st.booleans()}),
    st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "completion", "label"]),
                    st.one_of(_value, st.booleans()), max_size=5),
    st.fixed_dictionaries({"prompt": _value, "chosen": _value, "rejected": _value}),
    st.fixed_dictionaries({"chosen": _value, "rejected": _value}),
    st.fixed_dictionaries({"prompt": _value, "completion": _value,
                           "label": st.one_of(st.booleans(), _json)}),
    _json)
FUZZ_OPTS = P.TokenizeOptions(max_length=24, max_prompt_length=10)
FUZZ_BUCKETS = P.default_buckets(24, smallest=8)
WORD = word_tokenizer()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=st.lists(_row, min_size=1, max_size=3), word=st.booleans(),
       mode=st.sampled_from(["keep_end", "keep_start"]), skip=st.booleans())
def test_fuzz_rows_give_a_valid_batch_or_a_data_error(rows, word, mode, skip):
  tok = WORD if word else BYTE
  opts = dataclasses.replace(FUZZ_OPTS, truncation_mode=mode)
  for row in rows:   # normalize alone: a dict or a DataError
    try:
      r = P.normalize(row, "fuzz")
    except P.DataError as e:
      assert str(e).startswith("fuzz: ")
    else:
      assert set(r) == {"prompt", "chosen", "rejected", "label", "conversational"}
  try:
    exs, skipped = P.tokenize_rows(rows, tok, opts, "fuzz", "skip" if skip else "fail")
  except P.DataError as e:
    assert str(e).startswith("fuzz")
    event("DataError")
    return
  event("batch")
  assert len(exs) + skipped == len(rows)
  for e in exs:
    assert 1 <= len(e.prompt) <= opts.max_prompt_length
    for c in (e.chosen, e.rejected or [1]):
      assert 1 <= len(c) and len(e.prompt) + len(c) <= opts.max_length
    assert all(isinstance(t, int) and 0 <= t < len(tok) for t in e.prompt + e.chosen)
  batch = P.collate(exs, FUZZ_BUCKETS, tok.pad_token_id)
  _check_batch(batch, FUZZ_BUCKETS, tok.pad_token_id, len(exs))
  assert (batch["segment_ids"].sum(1) <= opts.max_length).all()
  for v in batch.values():
    assert np.isfinite(v).all()
  assert set(np.unique(batch["label"])) <= {0.0, 1.0}


def test_prompt_completion_rows_are_demonstrations():
  """TRL's prompt-completion (SFT) rows: no label means a desirable completion."""
  tok = byte_tokenizer()
  examples, skipped = P.tokenize_rows(
      [{"prompt": "Say hi.", "completion": "hi"}], tok, P.TokenizeOptions(64, 32))
  assert skipped == 0 and examples[0].label == 1.0 and examples[0].rejected is None
  assert examples[0].chosen == tok.encode("hi", add_special_tokens=False) + [tok.eos_token_id]


def test_ultrafeedback_binarized_layout():
  """A string prompt with conversations that repeat it (HuggingFaceH4/ultrafeedback_binarized):
  the shared prefix is the prompt, checked against the string."""
  u = {"role": "user", "content": "hi there"}
  row = {"prompt": "hi there", "chosen": [u, {"role": "assistant", "content": "hello"}],
         "rejected": [u, {"role": "assistant", "content": "go away"}]}
  out = P.normalize(row, "uf.jsonl row 1")
  assert out["prompt"] == [u] and out["conversational"]
  assert out["chosen"] == [{"role": "assistant", "content": "hello"}]
  with pytest.raises(P.DataError, match=r"uf.jsonl row 2: field 'prompt' is a string but"):
    P.normalize({**row, "prompt": "something else"}, "uf.jsonl row 2")


# ---------------------------------------------------------------------------------------------
# Tokenising shared among processes (distributed.tokenize_split)
# ---------------------------------------------------------------------------------------------


class Stream:
  """Rows without random access, as a datasets.IterableDataset gives them: each pass iterates
  the rows again. `yielded` counts the rows handed out."""

  def __init__(self, rows):
    self.rows, self.yielded = rows, 0

  def __iter__(self):
    for row in self.rows:
      self.yielded += 1
      yield row


def tokenize_as_processes(rows, tok, opts, source, on_error, count, **kw):
  """tokenize_rows as each of `count` processes runs it: one thread each, whose exchange is an
  all-gather (every thread hands in its bytes at a barrier, then all read every thread's).
  `rows` may be a function of the process index. Returns each process's examples and skip count,
  or its DataError's message, and the number of exchanges each made."""
  slots, barrier = [None] * count, threading.Barrier(count, timeout=120)
  out, calls = [None] * count, [0] * count

  def exchange(i, mine):
    slots[i] = mine
    barrier.wait()
    got = list(slots)
    barrier.wait()   # no slot is overwritten before every thread has read it
    calls[i] += 1
    return got

  def run(i):
    try:
      out[i] = P.tokenize_rows(rows(i) if callable(rows) else rows, tok, opts, source,
                               on_error, part=(i, count),
                               exchange=functools.partial(exchange, i), **kw)
    except P.DataError as e:
      out[i] = str(e)
    except BaseException as e:   # noqa: BLE001 (fails the comparison; frees the others)
      out[i] = e
      barrier.abort()

  threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return out, calls


def outcome(rows, tok, opts, source, on_error, **kw):
  try:
    return P.tokenize_rows(rows, tok, opts, source, on_error, **kw)
  except P.DataError as e:
    return str(e)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=st.lists(_row, min_size=1, max_size=7), count=st.sampled_from([1, 2, 3]),
       round_rows=st.sampled_from([1, 2, 3, P.ROUND_ROWS]), spill=st.booleans(),
       word=st.booleans(), skip=st.booleans(), stream=st.booleans())
def test_rounds_and_processes_get_what_one_pass_gets(rows, count, round_rows, spill, word, skip,
                                                     stream):
  """Tokenising in rounds of a few rows, into memory or a file, by one process or by several
  sharing the rows, from a list or a stream of rows, ends in every process with the examples,
  skip count or first error (the same row named) that one process tokenising every row of a list
  in one round gets, whichever process tokenised the bad or first row and whichever round it
  fell in."""
  tok, on_error = (WORD if word else BYTE), ("skip" if skip else "fail")
  whole = outcome(rows, tok, FUZZ_OPTS, "fuzz", on_error)
  given = Stream(rows) if stream else rows
  with tempfile.TemporaryDirectory() as tmp:
    kw = dict(round_rows=round_rows, spill_dir=tmp if spill else None)
    if count == 1:
      got = [outcome(given, tok, FUZZ_OPTS, "fuzz", on_error, **kw)]
    else:
      got, calls = tokenize_as_processes(given, tok, FUZZ_OPTS, "fuzz", on_error, count, **kw)
      per = count * -(-round_rows // count)   # a round's rows, a multiple of the processes
      rounds = len(rows) // per + 1   # the last round is short: empty when per divides the rows
      assert calls == [rounds] * count or isinstance(whole, str)   # an error may end it early
    assert got == [whole] * count
    assert os.listdir(tmp) == []   # the file of ids was deleted when it was opened


def test_a_stream_is_read_a_round_at_a_time(monkeypatch):
  """Rows without random access are pulled a round at a time: when a round is tokenised, no row
  of a later round has been read."""
  rows = [good(i) for i in range(10)]
  stream, seen, part = Stream(rows), [], P.tokenize_part
  monkeypatch.setattr(P, "tokenize_part", lambda *a: seen.append(stream.yielded) or part(*a))
  assert P.tokenize_rows(stream, BYTE, OPTS, round_rows=4) == P.tokenize_rows(rows, BYTE, OPTS)
  assert seen[:3] == [4, 8, 10]
  seen.clear()   # shared: each of 2 processes reads every row and tokenises its own
  got, calls = tokenize_as_processes(lambda i: Stream(rows), BYTE, OPTS, "s", "fail", 2,
                                     round_rows=4)
  assert got == [P.tokenize_rows(rows, BYTE, OPTS)] * 2 and calls == [3, 3]
  source, odd = P.load_rows(iter([good(0), 3]))   # a row that is not an object: a row error
  with pytest.raises(P.DataError, match=r"^<dataset>: row 2: expected an object with fields "):
    P.tokenize_rows(odd, BYTE, OPTS, source)


def test_processes_with_different_rows_fail_together():
  """Processes whose rows differ in number (a stream that differs between hosts) all stop with
  an error in the round where they part, instead of waiting for each other's exchange."""
  for (n0, n1, sizes), kind in itertools.product(
      ((5, 6, [1, 2]), (4, 5, [0, 1]), (9, 2, [4, 2])), (list, Stream)):
    got, _ = tokenize_as_processes(lambda i: kind((ROWS * 2)[:(n0, n1)[i]]),   # noqa: B023
                                   BYTE, OPTS, "s", "fail", 2, round_rows=4)
    first = (min(n0, n1) // 4) * 4
    assert got == [f"s: the processes read different rows: in rows {first + 1} to {first + 4}, "
                   f"processes 0..1 read {sizes} rows (every process must read the same data "
                   f"set in the same order)"] * 2


def test_each_process_tokenises_only_its_rows(tmp_path, monkeypatch):
  lines = [json.dumps(good(0)), "{bad", json.dumps(good(1)), "",
           json.dumps({"prompt": "p", "completion": "c", "label": True}), json.dumps(good(2)),
           json.dumps(good(3))]
  source, rows = P.load_rows(write_jsonl(tmp_path / "d.jsonl", lines))
  seen, render = [], P._render
  monkeypatch.setattr(P, "_render", lambda tok, prompt, *a: seen.append(prompt) or
                      render(tok, prompt, *a))
  parts = [P.tokenize_part(rows, BYTE, OPTS, source, rows.numbers, range(i, len(rows), 2))
           for i in (0, 1)]
  assert [part.index.tolist() for part in parts] == [[0, 2, 4], [1, 3, 5]]
  assert len(seen) == 5   # 5 readable rows: each rendered once, by one process
  assert (parts[1].index[0], parts[1].paired[0], parts[1].errors[0]) == (
      1, -1, f"{source}: row 2: invalid JSON (Expecting property name enclosed in double "
             f"quotes at column 2)")
  for on_error in ("fail", "skip"):
    assert tokenize_as_processes(rows, BYTE, OPTS, source, on_error, 2)[0] == [outcome(
        rows, BYTE, OPTS, source, on_error)] * 2
  assert tokenize_as_processes(rows, BYTE, OPTS, source, "skip", 2)[0][0][1] == 2
  with pytest.raises(ValueError, match=r"a part of the rows needs an exchange"):
    P.tokenize_rows(rows, BYTE, OPTS, part=(0, 2))


# ---------------------------------------------------------------------------------------------
# Examples: tokenised examples held as arrays
# ---------------------------------------------------------------------------------------------


_ids = st.lists(st.integers(0, (1 << 17) - 1), min_size=1, max_size=6)
_example = st.builds(lambda p, c, r, paired, label, cut: P.Tokenized(
    p, c, r if paired else None, label, cut if paired else cut & 3),
    _ids, _ids, _ids, st.booleans(), st.sampled_from([0.0, 1.0, 0.25]), st.integers(0, 7))


def cuts(examples):
  return [e.cut for e in examples]


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(ex=st.lists(_example, max_size=8), small=st.booleans(), data=st.data())
def test_examples_behave_as_the_list_they_hold(ex, small, data):
  """Examples against a plain list of Tokenized: items, slices, index arrays, lengths, dtype."""
  if small:
    ex = [P.Tokenized([t % 300 for t in e.prompt], [t % 300 for t in e.chosen],
                      None if e.rejected is None else [t % 300 for t in e.rejected], e.label,
                      e.cut) for e in ex]
  e = P.Examples.of(ex)
  assert len(e) == len(ex) and e == ex and list(e) == ex and P.Examples.of(e) is e
  assert cuts(e) == cuts(ex) == e.cut.tolist()   # Tokenized's == leaves the cut flags out
  ids = [t for x in ex for seq in (x.prompt, x.chosen, x.rejected or []) for t in seq]
  assert e.tokens.dtype == (np.uint16 if max(ids, default=0) < 1 << 16 else np.int32)
  assert e.tokens.tolist() == ids
  for i in range(-len(ex), len(ex)):
    got = e[i]
    assert got == ex[i] and isinstance(got.label, float)
    assert all(type(t) is int for t in got.prompt + got.chosen + (got.rejected or []))
  with pytest.raises(IndexError):
    e[len(ex)]   # noqa: B018
  start, stop = data.draw(st.integers(-9, 9)), data.draw(st.integers(-9, 9))
  step = data.draw(st.sampled_from([1, 2, -1, -3]))
  assert e[start:stop:step] == ex[start:stop:step]
  idx = data.draw(st.lists(st.integers(0, max(len(ex) - 1, 0)), max_size=10)) if ex else []
  view = e.take(idx)
  assert view == [ex[i] for i in idx] == e[np.array(idx, np.int64)]
  assert cuts(view) == [ex[i].cut for i in idx]
  assert view.tokens is e.tokens   # a view: no ids copied
  view.COMPACT_BLOCK = 2   # compact() in several blocks
  own = view.compact()
  assert own == [ex[i] for i in idx] and own.contiguous and own.compact() is own
  assert own == view and cuts(own) == cuts(view)
  assert own.tokens.dtype == e.tokens.dtype
  assert own.tokens.tolist() == [t for i in idx for x in [ex[i]]
                                 for seq in (x.prompt, x.chosen, x.rejected or []) for t in seq]
  assert e.contiguous and view.contiguous == (idx == list(range(len(ex))))
  assert e[::-1] == ex[::-1]
  assert e.longest == max((len(x.prompt) + max(len(x.chosen), len(x.rejected or []))
                           for x in ex), default=0)
  both = P.Examples.concat([e, view, view[::-1]])
  assert both == ex + [ex[i] for i in idx] + [ex[i] for i in idx][::-1]
  assert cuts(both) == cuts(ex) + [ex[i].cut for i in idx] + [ex[i].cut for i in idx][::-1]
  assert both[len(ex):].take(range(len(idx))) == [ex[i] for i in idx]   # a view of a view


def test_examples_reject_arrays_that_do_not_match():
  with pytest.raises(ValueError, match=r"2 lengths for 5 tokens \(6 expected\)"):
    P.Examples(np.arange(5), [[1, 1, 1], [1, 1, 1]], [1.0, 1.0])
  with pytest.raises(ValueError, match=r"2 lengths, 1 labels and 2 cut flags"):
    P.Examples(np.arange(6), [[1, 1, 1], [1, 1, 1]], [1.0])
  with pytest.raises(ValueError, match=r"2 lengths, 2 labels and 1 cut flags"):
    P.Examples(np.arange(6), [[1, 1, 1], [1, 1, 1]], [1.0, 1.0], cut=[0])
  with pytest.raises(ValueError, match=r"2 starts for 2 examples do not lie within 6 tokens"):
    P.Examples(np.arange(6), [[1, 1, 1], [1, 1, 1]], [1.0, 1.0], starts=[0, 4])
  with pytest.raises(ValueError, match=r"1 starts for 2 examples"):
    P.Examples(np.arange(6), [[1, 1, 1], [1, 1, 1]], [1.0, 1.0], starts=[0])
  with pytest.raises(ValueError, match=r"must be a flat uint16 or int32 array, got int64"):
    P.Examples(np.arange(3), [[1, 1, 1]], [1.0], narrow=False)
  overlapping = P.Examples(np.arange(4), [[1, 1, 1], [1, 1, 1]], [1.0, 0.0], starts=[1, 0])
  assert list(overlapping) == [P.Tokenized([1], [2], [3], 1.0), P.Tokenized([0], [1], [2], 0.0)]
  with pytest.raises(ValueError, match=r"must be integers that fit int32, got int64 from 0 to "
                                       r"4294967296"):
    P.Examples(np.array([0, 1 << 32]), [[1, 1, -1]], [1.0])


def test_tokenised_data_sets_are_held_as_arrays():
  """tokenize_rows returns Examples: 2 bytes a token for the byte tokenizer (ids < 264), the
  rows in order, each as tokenising it alone gives it."""
  rows = [good(i) for i in range(5)]
  exs, _ = P.tokenize_rows(rows, BYTE, OPTS)
  assert isinstance(exs, P.Examples) and exs.tokens.dtype == np.uint16
  assert exs.tokens.nbytes == 2 * sum(len(e.prompt) + len(e.chosen) + len(e.rejected)
                                      for e in exs)
  assert list(exs) == [P.tokenize_rows([r], BYTE, OPTS)[0][0] for r in rows]


def test_padding_id_is_the_pad_token_else_eos_else_zero():
  """One rule for every tool (train, score, rank, pairs): pad, else EOS, else 0."""
  assert P.pad_id(BYTE) == BYTE.pad_token_id == BYTE.convert_tokens_to_ids("<|pad|>")
  tok = lambda pad, eos: types.SimpleNamespace(pad_token_id=pad, eos_token_id=eos)   # noqa: E731
  assert [P.pad_id(tok(5, 7)), P.pad_id(tok(None, 7)), P.pad_id(tok(None, None)),
          P.pad_id(tok(0, 7))] == [5, 7, 0, 0]


# ---------------------------------------------------------------------------------------------
# The tokenised-data cache (preference.tokenize_cached)
# ---------------------------------------------------------------------------------------------


def test_tokenised_data_is_cached_and_invalidated(tmp_path, monkeypatch):
  calls, tokenise = [], P.tokenize_rows
  monkeypatch.setattr(P, "tokenize_rows", lambda *a, **k: calls.append(1) or tokenise(*a, **k))
  cache = str(tmp_path / "cache")
  lines = [json.dumps(good(i)) for i in range(4)] + ["{bad"]
  path = write_jsonl(tmp_path / "d.jsonl", lines)

  def run(src=path, tok=BYTE, opts=OPTS, on_error="skip"):
    calls.clear()
    out = P.tokenize_cached(cache, P.load_rows(src)[1], tok, opts, "s", on_error)
    return out, len(calls)

  want = tokenise(P.load_rows(path)[1], BYTE, OPTS, "s", "skip")
  assert run() == (want, 1) and run() == (want, 0)   # tokenised, then read
  assert len(os.listdir(cache)) == 1 and want[1] == 1
  assert run(opts=P.TokenizeOptions(64, 16))[1] == 1            # other options
  assert run(tok=word_tokenizer())[1] == 1                      # another tokenizer
  with pytest.raises(P.DataError, match="row 5: invalid JSON"):   # on_error is in the key
    run(on_error="fail")
  write_jsonl(tmp_path / "d.jsonl", lines[:3])                  # the file changed
  assert run() == (tokenise(P.load_rows(path)[1], BYTE, OPTS, "s"), 1)
  assert len(os.listdir(cache)) == 4
  for name in os.listdir(cache):                                # unreadable: tokenise again
    (tmp_path / "cache" / name).write_bytes(b"not an npz")
  assert run() == (tokenise(P.load_rows(path)[1], BYTE, OPTS, "s"), 1) and run()[1] == 0
  # a dataset's fingerprint and a list's JSON are keys too; a slow tokenizer is not cached
  datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
  assert run(str(tmp_path / "ds"))[1] == 1 and run(str(tmp_path / "ds"))[1] == 0
  assert run(ROWS)[1] == 1 and run(ROWS)[1] == 0 and run(ROWS[:2])[1] == 1
  slow = types.SimpleNamespace(**{k: getattr(BYTE, k) for k in (
      "bos_token_id", "eos_token_id", "chat_template")})
  assert P.cache_key(ROWS, slow, OPTS, "fail") is None
  assert P.cache_key(P._LazyRows(2, ROWS.__getitem__), BYTE, OPTS, "fail") is None


def test_npz_files_are_written_a_chunk_at_a_time_as_numpy_reads_them(tmp_path):
  """writers.write_npz writes what np.load reads back (0-d, 2-D, transposed, empty), a chunk at
  a time: writing 8 MB of ids mapped from a file traces under a quarter of their bytes (np.savez
  copies them whole), and read_npz maps them from the written file."""
  raw = tmp_path / "ids.raw"
  np.arange(4 << 20, dtype=np.uint16).tofile(raw)
  ids = np.memmap(raw, np.uint16, "r")
  arrays = {"tokens": ids, "lens": np.arange(12, dtype=np.int32).reshape(4, 3),
            "skipped": np.int64(3), "labels": np.linspace(0, 1, 4),
            "empty": np.zeros((0, 3), np.int32), "t": np.arange(12.0).reshape(3, 4).T}
  path = str(tmp_path / "a.npz")
  tracemalloc.start()
  try:
    writers.write_npz(path, arrays)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < ids.nbytes / 4, peak
  with np.load(path) as z:
    assert sorted(z.files) == sorted(arrays)
    for k, v in arrays.items():
      assert z[k].dtype == v.dtype and z[k].shape == v.shape and np.array_equal(z[k], v), k
  mapped = writers.read_npz(path, mapped=("tokens",))["tokens"]
  assert isinstance(mapped.base, np.memmap) and np.array_equal(mapped, ids)
  with pytest.raises(ValueError, match=r"array 'names' holds Python objects"):
    writers.write_npz(path, {"names": np.array(["a", None])})
  assert np.array_equal(np.load(path)["tokens"], ids)   # the file before is left as it was
  assert sorted(os.listdir(tmp_path)) == ["a.npz", "ids.raw"]   # and no temporary file


def test_cached_ids_are_mapped_from_the_file(tmp_path, monkeypatch):
  """tokenize_cached hands back the ids mapped from its file (also right after writing it), a
  rename over the file leaves a mapping on the old contents, and a file without the cut flags,
  one with starts out of range, or a compressed one are handled."""
  calls, tokenise = [], P.tokenize_rows
  monkeypatch.setattr(P, "tokenize_rows", lambda *a, **k: calls.append(1) or tokenise(*a, **k))
  cache = str(tmp_path / "cache")
  rows = [good(i) for i in range(6)] + [{"prompt": "p"}]
  want = tokenise(rows, BYTE, OPTS, "s", "skip")

  def run():
    calls.clear()
    out = P.tokenize_cached(cache, rows, BYTE, OPTS, "s", "skip")
    return out, len(calls)

  (first, skipped), n = run()
  assert (first, skipped) == want and n == 1 and skipped == 1
  assert isinstance(first.tokens.base, np.memmap) and not first.tokens.flags.writeable
  (again, _), n = run()
  assert again == first and n == 0 and isinstance(again.tokens.base, np.memmap)
  view = again.take([4, 0])
  assert view.tokens is again.tokens and view == [want[0][4], want[0][0]]
  [path] = [os.path.join(cache, f) for f in os.listdir(cache)]
  ex = want[0]
  writers.write_npz(path, {"tokens": ex.tokens[::-1].copy(), "lens": ex.lens, "labels": ex.labels,
                           "starts": ex.starts, "cut": ex.cut,
                           "skipped": np.int64(1)})   # replaced under the mapping
  assert first == want[0] and again == want[0]
  (old, _), n = run()
  assert n == 0 and old.tokens.tolist() == ex.tokens[::-1].tolist() and old != want[0]
  writers.write_npz(path, {"tokens": ex.tokens, "lens": ex.lens, "labels": ex.labels,
                           "starts": ex.starts + 1, "cut": ex.cut, "skipped": np.int64(1)})
  assert run() == (want, 1)   # starts past the end: tokenised again
  writers.write_npz(path, {"tokens": ex.tokens, "lens": ex.lens, "labels": ex.labels,
                           "starts": ex.starts, "skipped": np.int64(1)})
  assert run() == (want, 1)   # no cut flags (written before them): tokenised again
  with open(path, "wb") as f:
    np.savez_compressed(f, tokens=ex.tokens, lens=ex.lens, labels=ex.labels, starts=ex.starts,
                        cut=ex.cut, skipped=np.int64(1))
  assert run() == (want, 1) and run() == (want, 0)   # compressed: not mapped, written again
  scratch = tmp_path / "scratch"   # $TMPDIR: the ids are tokenised into a file there
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  spilled, skipped = P.tokenize_cached(None, rows, BYTE, OPTS, "s", "skip")   # no cache
  assert (spilled, skipped) == want and isinstance(spilled.tokens.base, np.memmap)
  with open("/proc/self/maps") as f:   # mapped from a deleted file in $TMPDIR
    assert any(str(scratch) in line and "(deleted)" in line for line in f)
  assert os.listdir(scratch) == []


def test_tokenising_into_a_file_holds_a_round_of_ids_not_the_data_set(tmp_path):
  """With spill_dir (tokenize_cached's: $TMPDIR) the ids go to a file a round at a time:
  from 300 to 1,200 rows the peak of traced memory grows by under a tenth of the added ids (the
  examples' lengths and labels), while tokenising into memory grows by more than the ids; the
  examples are the same, mapped read-only, and no file is left."""
  rows = [{"prompt": f"q{i} " + "p" * (100 + i % 50), "chosen": "c" * (150 + i % 70),
           "rejected": "r" * (120 + i % 90)} for i in range(1200)]
  opts = P.TokenizeOptions(1024, 512)

  def peak(n, **kw):
    tracemalloc.start()
    try:
      out = P.tokenize_rows(rows[:n], BYTE, opts, round_rows=64, **kw)
      return out[0], tracemalloc.get_traced_memory()[1]
    finally:
      tracemalloc.stop()

  spill = str(tmp_path / "spill")
  (small, held_small), (_, filed_small) = peak(300), peak(300, spill_dir=spill)
  (held, held_peak), (filed, filed_peak) = peak(1200), peak(1200, spill_dir=spill)
  added = held.tokens.nbytes - small.tokens.nbytes
  assert added > 800_000 and held.tokens.dtype == np.uint16
  assert held_peak - held_small > added, (added, held_small, held_peak)
  assert filed_peak - filed_small < added / 10, (added, filed_small, filed_peak)
  assert filed == held and isinstance(filed.tokens.base, np.memmap)
  assert not filed.tokens.flags.writeable and os.listdir(spill) == []


@pytest.mark.parametrize("spill", [False, True])
def test_ids_past_uint16_in_a_later_round_widen_the_stored_ones(tmp_path, spill):
  """Rounds stored as uint16 become int32 when a later round holds an id past 65535."""
  words = [f"w{i}" for i in range(70_000)]
  vocab = {s: i for i, s in enumerate(WORD_SPECIALS + words)}
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                             eos_token="</s>", pad_token="<pad>",
                                             unk_token="<unk>")
  rows = [{"prompt": f"w{i} w{2 * i}", "chosen": f" w{3 * i}", "rejected": f" w{i + 1}"}
          for i in range(6)] + [{"prompt": "w1", "chosen": " w69999", "rejected": " w2"}]
  spill_dir = str(tmp_path) if spill else None
  first, _ = P.tokenize_rows(rows[:6], tok, OPTS, round_rows=2, spill_dir=spill_dir)
  assert first.tokens.dtype == np.uint16
  got, _ = P.tokenize_rows(rows, tok, OPTS, round_rows=2, spill_dir=spill_dir)
  want = [P.Tokenized([tok.bos_token_id] + [vocab[w] for w in r["prompt"].split()],
                      [vocab[r["chosen"].strip()], tok.eos_token_id],
                      [vocab[r["rejected"].strip()], tok.eos_token_id], 1.0) for r in rows]
  assert got.tokens.dtype == np.int32 and list(got) == want and got[:6] == first


def test_the_cache_keeps_the_files_used_last(tmp_path):
  """keep=K: after a write the directory holds the K files written or read last; a file mapped
  by a reader survives its deletion; temporary and other files are left alone; keep=0 keeps all."""
  cache = tmp_path / "cache"
  run = lambda n, keep=2: P.tokenize_cached(str(cache), ROWS[:n], BYTE, OPTS, keep=keep)[0]  # noqa: E731
  held = run(1)
  names = lambda: sorted(os.listdir(cache))   # noqa: E731
  first = names()
  run(2)
  assert len(names()) == 2
  os.utime(cache / first[0], ns=(1, 1))   # written long ago,
  assert run(1) == held                     # but read now: it is the newest
  (cache / "x.tmp0.npz").write_bytes(b"")   # a write in progress (write_atomic)
  (cache / "notes.txt").write_bytes(b"")
  third = run(3)
  assert first[0] in names() and len(names()) == 4   # 1 and 3 rows, and the other two files
  assert third == P.tokenize_rows(ROWS[:3], BYTE, OPTS)[0]
  run(4)
  assert first[0] not in names() and held == P.tokenize_rows(ROWS[:1], BYTE, OPTS)[0]
  run(5, keep=0)
  assert len(names()) == 5


@pytest.mark.parametrize("other_has_it", [True, False])
def test_processes_read_the_cache_only_when_all_have_it(tmp_path, other_has_it):
  """Process 0 of 2 finds the cache: it reads it if process 1 does too, else both tokenise (the
  exchange of parts is collective)."""
  cache = str(tmp_path / "cache")
  whole = P.tokenize_cached(cache, ROWS, BYTE, OPTS)
  theirs = P.pack_part(dataclasses.replace(   # process 1's part of the round of 5 rows
      P.tokenize_part(ROWS, BYTE, OPTS, "<rows>", range(1, 6), range(1, 5, 2)), round_rows=5))
  sent = []

  def exchange(mine):
    sent.append(mine)
    if len(sent) == 1:   # do all processes have the cache?
      return [mine, b"1" if other_has_it else b"0"]
    return [mine, theirs]
  got = P.tokenize_cached(cache, ROWS, BYTE, OPTS, part=(0, 2), exchange=exchange)
  assert got == whole and sent[0] == b"1" and len(sent) == (1 if other_has_it else 2)
  sent.clear()   # no cache: no agreement, only the exchange of parts
  assert P.tokenize_cached(None, ROWS, BYTE, OPTS, part=(0, 2), exchange=lambda mine: (
      sent.append(mine) or [mine, theirs])) == whole and len(sent) == 1
