"""Bad settings and files fail at setup with a ValueError (or a flag error) naming the key, flag
or file, not deep inside JAX."""
import re

import numpy as np
import pytest

from dpo_jax import build, export, rank, reference, score, teacher
from dpo_jax.models import TINY, hf_io, layers, load
from dpo_jax.models import config as model_config
from helpers import config
from helpers_hf import tiny_hf_model


@pytest.mark.parametrize("key,value", [("model.dtype", "float33"),
                                       ("model.param_dtype", "fp32")])
def test_bad_model_dtype_names_the_config_key(key, value):
  with pytest.raises(ValueError, match=rf"config\.{re.escape(key)}='{value}' is not a "
                     r"supported dtype; use one of \('float32', 'bfloat16', 'float16'\)"):
    build.setup(config(**{key.replace(".", "__"): value}))


def test_bad_remat_names_the_config_key():
  with pytest.raises(ValueError, match=r"config\.model\.remat='some'.*'full', 'dots', 'none'"):
    build.setup(config(model__remat="some"))   # before anything is compiled
  assert tuple(layers.REMAT_POLICIES) == model_config.REMAT   # the names ModelConfig accepts


def test_bad_reference_and_teacher_dtype_name_the_config_key():
  ref_cfg = config(reference__dtype="bf16").reference
  with pytest.raises(ValueError, match=r"config\.reference\.dtype='bf16'.*'bfloat16'"):
    reference.build("initial", ref_cfg, None, TINY, None, None, None, chunk=64)
  teacher_cfg = config(teacher__dtype="half").teacher
  with pytest.raises(ValueError, match=r"config\.teacher\.dtype='half'.*'float16'"):
    teacher.build(teacher_cfg, None, TINY, None, None, chunk=64, workdir=None, batch_size=2,
                  buckets=(), pad_id=0)


def test_score_bad_dtype_names_the_flag(tmp_path):
  with pytest.raises(ValueError, match=r"--dtype='float33' is not a supported dtype"):
    score.main(["--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"),
                "--out", str(tmp_path / "o.jsonl"), "--dtype", "float33"])
  assert not (tmp_path / "o.jsonl").exists()


def test_export_bad_dtype_names_the_flag(tmp_path):
  with pytest.raises(ValueError, match=r"--dtype='fp8' is not a supported dtype"):
    export.main(["--checkpoint", str(tmp_path / "w"), "--out", str(tmp_path / "o"),
                 "--dtype", "fp8"])
  assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value,error", [("", r"config.data.train=''"),
                                         ("notes.txt", "'.txt' is not a data format"),
                                         ("missing", "missing: no such file or directory")])
def test_a_data_source_that_is_not_data_is_named(tmp_path, value, error):
  """An empty data.train was an IndexError inside datasets; a file of another type a
  FileNotFoundError saying no data file was found; a mistyped directory a failure to reach the
  Hugging Face hub."""
  if value:
    value = str(tmp_path / value)
    if not value.endswith("missing"):
      open(value, "w").write("hello\n")
  with pytest.raises(ValueError, match=error):
    build.setup(config(data__train=value))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf") / "model"
  tiny_hf_model("llama").save_pretrained(path)
  return path


@pytest.mark.parametrize("text,error", [('{"model_type": "llama",', "not valid JSON"),
                                        ("[1, 2]", "expected a JSON object, got list"),
                                        ('{"model_type": "llama"}', "missing key")])
def test_bad_hf_config_json_names_the_file(hf_dir, tmp_path, text, error):
  import shutil
  bad = tmp_path / "bad"
  shutil.copytree(hf_dir, bad)
  (bad / "config.json").write_text(text)
  with pytest.raises(ValueError, match=re.escape(f"{bad / 'config.json'}: {error}")):
    load.model_config(str(bad), TINY)


def test_bad_safetensors_index_names_the_file(hf_dir, tmp_path):
  import shutil
  bad = tmp_path / "bad"
  shutil.copytree(hf_dir, bad)
  index = bad / hf_io.INDEX_FILE
  index.write_text("{")
  with pytest.raises(ValueError, match=re.escape(f"{index}: not valid JSON")):
    hf_io.load_hf(str(bad))


@pytest.mark.parametrize("flag,value", [("--bootstrap", "-5"), ("--seed", "-1"),
                                        ("--beta", "0"), ("--beta", "nan"),
                                        ("--batch_size", "0")])
def test_rank_bad_numbers_name_the_flag(capsys, flag, value):
  with pytest.raises(SystemExit) as e:
    rank.main(["--models", "m", "--data", "d", flag, value])
  assert e.value.code == 2
  assert f"{flag}={value}" in capsys.readouterr().err


def test_score_bad_numbers_name_the_flag(capsys):
  for flag, value in (("--beta", "-0.1"), ("--batch_size", "-4")):
    with pytest.raises(SystemExit) as e:
      score.main(["--model", "m", "--data", "d", "--out", "o", flag, value])
    assert e.value.code == 2
    assert f"{flag}={value}" in capsys.readouterr().err


def test_rank_bootstrap_zero_gives_point_estimates(monkeypatch, capsys):
  correct = {"a": np.array([1.0, 1.0, 0.0, 1.0]), "b": np.array([0.0, 1.0, 0.0, 0.0])}
  margins = {"a": np.array([0.5, 0.2, -0.1, 0.3]), "b": np.array([-0.2, 0.1, -0.3, -0.1])}
  with pytest.raises(ValueError, match=r"--bootstrap=-5 must be >= 0"):
    rank.bootstrap(correct, margins, -5)
  full, bare = rank.bootstrap(correct, margins, 50), rank.bootstrap(correct, margins, 0)
  assert bare["bootstrap"] == 0
  assert [{k: r[k] for k in ("model", "rank", "accuracy", "margin")} for r in full["ranking"]] == (
      bare["ranking"])   # the same ranking, without intervals or win fractions
  monkeypatch.setattr(rank, "score_models",
                      lambda models, data, **kw: {m: (correct[m], margins[m]) for m in models})
  out = rank.main(["--models", "a", "b", "--data", "d", "--bootstrap", "0"])
  assert out["ranking"] == bare["ranking"]
  printed = capsys.readouterr().out
  assert "no bootstrap" in printed and "| 1 | a | 0.750 | 0.225 |" in printed


def test_a_teacher_with_another_tokenizer_is_refused():
  """daDPO's teacher reads the student's ids: an equal vocabulary size is not enough."""
  from helpers_hf import tiny_tokenizer
  byte = load.load_tokenizer(None)
  check = lambda tok: reference.check_tokenizer(tok, byte, "config.teacher.path=T")
  check(load.load_tokenizer(None))   # the same: accepted
  with pytest.raises(ValueError, match="config.teacher.path=T: its tokenizer encodes text"):
    check(tiny_tokenizer(264))



def test_a_teacher_vocabulary_must_cover_the_tokenizer():
  """Embeddings of different sizes pass only when each covers every id of the shared tokenizer
  (264 here)."""
  byte = load.load_tokenizer(None)
  teacher.check_vocabulary(280, 264, byte, "T")        # padded teacher: accepted
  teacher.check_vocabulary(264, 300, byte, "T")        # padded student: accepted
  with pytest.raises(ValueError, match="config.teacher.path=T: vocabulary of 260 tokens, the "
                     "student has 264, and their tokenizer has 264"):
    teacher.check_vocabulary(260, 264, byte, "T")
  with pytest.raises(ValueError, match="no tokenizer shows which ids"):
    teacher.check_vocabulary(280, 264, None, "T")


def test_score_and_rank_refuse_rows_and_models_they_cannot_score(tmp_path):
  """Unpaired rows (their 'rejected' would be another row's completion), a model whose
  vocabulary the data's ids run past (NaN scores), and a --ref with another tokenizer are
  refused by name, before anything is written."""
  from dpo_jax.data import preference
  from dpo_jax.data.tokenizer import byte_tokenizer
  from helpers_hf import tiny_tokenizer
  byte = byte_tokenizer()
  for name, cfg, tok in (("fits", TINY, byte), ("small", TINY.replace(vocab_size=97), byte),
                         ("words", TINY, tiny_tokenizer(TINY.vocab_size))):
    hf_io.save_hf(str(tmp_path / name), cfg, hf_io_params(cfg), tokenizer=tok)
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text('{"prompt": "Add 2 and 2.", "chosen": "4", "rejected": "five"}\n')
  unpaired = tmp_path / "unpaired.jsonl"
  unpaired.write_text('{"prompt": "a", "completion": "b", "label": false}\n'
                      '{"prompt": "Add", "completion": "4", "label": true}\n')
  out = tmp_path / "scores.jsonl"
  fits, small = str(tmp_path / "fits"), str(tmp_path / "small")
  with pytest.raises(preference.DataError, match=r"unpaired.jsonl: row 1: unpaired \(prompt, "
                     r"completion, label\), as are 2 of 2 rows"):
    score.main(["--model", fits, "--data", str(unpaired), "--out", str(out)])
  with pytest.raises(preference.DataError, match="row 1: unpaired"):
    rank.main(["--models", fits, "--data", str(unpaired), "--bootstrap", "0"])
  with pytest.raises(ValueError, match=rf"{small}: a vocabulary of 97 tokens, but .*pairs.jsonl "
                     "tokenised with this tokenizer holds token id"):
    score.main(["--model", fits, "--ref", small, "--data", str(pairs), "--out", str(out)])
  with pytest.raises(ValueError, match=rf"{small}: a vocabulary of 97 tokens"):
    rank.main(["--models", fits, small, "--data", str(pairs), "--bootstrap", "0"])
  with pytest.raises(ValueError, match="--ref .*words: its tokenizer encodes text differently"):
    score.main(["--model", fits, "--ref", str(tmp_path / "words"), "--data", str(pairs),
                "--out", str(out)])
  assert not out.exists()
  score.main(["--model", fits, "--ref", fits, "--data", str(pairs), "--out", str(out)])
  assert out.exists()


def hf_io_params(cfg):
  from dpo_jax.models import init_params
  return init_params(cfg, 0)
