"""Host memory of a data set, measured with tracemalloc:
- the tokenised examples: preference.tokenize_rows's Examples (token ids in one uint16 or int32
  array) against the same examples as a list of Tokenized holding Python lists of ints (what
  tokenize_rows returned before it held arrays);
- the rows before tokenising: preference.load_rows on a JSONL file, on the same rows as one
  JSON array in a .json file, and on a `save_to_disk` directory (rows parsed or converted when
  indexed) against all rows as dicts (what it returned before), with the seconds to load and to read half of the rows (one process of two);
- a streamed parquet file (load_rows(streaming=True)): the peak of traced memory while it is
  tokenised a round of rows at a time, against reading the stream into a list first (what
  load_rows did with an IterableDataset before);
- the tokenised-data cache (preference.tokenize_cached): tokenising and writing it, then reading
  it as a rerun does, and the peak of traced memory while tokenising into it (the ids go to a
  file a round of rows at a time, so the peak is a round's, not the data set's);
- processes on one host holding the cached examples (4 by default): the ids mapped from the cache
  file, as tokenize_cached hands them back, against the same arrays read into each process's
  memory (what it did before), with each process's resident, proportional (PSS) and private
  bytes from /proc/self/smaps_rollup, and the time to read 10,000 random examples.

The tokenizer is a word-level one with a 50,000-word vocabulary, the words drawn Zipf-like with
ids unrelated to their frequency, so almost every id is above 256 and, as a Python int, an object
of its own (CPython caches -5..256 only): a real vocabulary's case.

    python benchmarks/example_memory.py [rows] [processes]   # seven JSON lines
"""
import gc
import json
import multiprocessing
import os
import sys
import tempfile
import time
import tracemalloc

import datasets

import numpy as np
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from dpo_jax import writers
from dpo_jax.data import preference

VOCAB = 50_000
TEMPLATE = ("{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' </s> ' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}")


def tokenizer():
  specials = ["<pad>", "<s>", "</s>", "<unk>", "<user>", "<assistant>"]
  vocab = {s: i for i, s in enumerate(specials + [f"w{i}" for i in range(VOCAB)])}
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(specials)
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
      unk_token="<unk>", chat_template=TEMPLATE)


def rows(n: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  word = rng.permutation(VOCAB)   # a word's id does not follow its frequency rank
  say = lambda k: " ".join(f"w{word[i]}" for i in rng.zipf(1.2, k) % VOCAB)   # noqa: E731
  return [{"prompt": [{"role": "user", "content": say(rng.integers(50, 300))}],
           "chosen": [{"role": "assistant", "content": say(rng.integers(50, 400))}],
           "rejected": [{"role": "assistant", "content": say(rng.integers(50, 400))}]}
          for _ in range(n)]


def held(make):
  """(object, bytes still allocated after make() returns, peak bytes during it)."""
  gc.collect()
  tracemalloc.start()
  base = tracemalloc.get_traced_memory()[0]
  out = make()
  now, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  return out, now - base, peak - base


def smaps() -> dict:
  """This process's resident, proportional and private bytes (Linux)."""
  out = {}
  with open("/proc/self/smaps_rollup") as f:
    for line in f:
      name, _, value = line.partition(":")
      if value.strip().endswith("kB"):
        out[name] = int(value.split()[0]) * 1024
  return {"rss": out["Rss"], "pss": out["Pss"],
          "private": out["Private_Clean"] + out["Private_Dirty"]}


def hold(path: str, mapped: bool, barrier, results):
  """One process: the cached examples, every id read; measured while every process holds them."""
  gc.collect()
  before = smaps()
  z = writers.read_npz(path, mapped=("tokens",) if mapped else ())
  examples = preference.Examples(z["tokens"], z["lens"], z["labels"], z.get("starts"),
                                 narrow=False)
  checksum = int(examples.tokens.sum(dtype=np.int64))   # every page touched
  barrier.wait()
  after = smaps()
  idx = np.random.default_rng(os.getpid()).integers(0, len(examples), 10_000)
  t = time.perf_counter()
  for i in idx:
    examples[i]
  access = time.perf_counter() - t
  barrier.wait()   # stay alive until every process has measured
  results.put({"checksum": checksum, "access_seconds": access,
               **{k: after[k] - before[k] for k in after}})


def shared(path: str, processes: int) -> dict:
  ctx = multiprocessing.get_context("spawn")
  out = {"processes": processes, "cache_file_bytes": os.path.getsize(path)}
  for mapped in (True, False):
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=hold, args=(path, mapped, barrier, results))
             for _ in range(processes)]
    for p in procs:
      p.start()
    got = [results.get() for _ in procs]
    for p in procs:
      p.join()
    assert len({g["checksum"] for g in got}) == 1
    kind = "mapped" if mapped else "in_memory"
    for k in ("rss", "pss", "private"):
      out[f"{kind}_{k}_bytes_per_process"] = int(np.mean([g[k] for g in got]))
    out[f"{kind}_pss_bytes_all_processes"] = int(sum(g["pss"] for g in got))
    out[f"{kind}_10000_examples_seconds"] = round(float(np.median(
        [g["access_seconds"] for g in got])), 3)
  return out


def main():
  n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
  processes = int(sys.argv[2]) if len(sys.argv) > 2 else 4
  data, tok = rows(n), tokenizer()
  opts = preference.TokenizeOptions(1024, 512)
  (examples, _), arrays, arrays_peak = held(
      lambda: preference.tokenize_rows(data, tok, opts, "bench"))
  as_lists, lists, _ = held(lambda: list(examples))
  tokens = examples.tokens.size
  big = float((examples.tokens > 256).mean())
  print(json.dumps({
      "rows": n, "tokens": tokens, "ids_above_256": round(big, 3),
      "token_dtype": str(examples.tokens.dtype),
      "arrays_bytes": arrays, "arrays_bytes_per_token": round(arrays / tokens, 2),
      "arrays_peak_bytes": arrays_peak,
      "lists_bytes": lists, "lists_bytes_per_token": round(lists / tokens, 2),
      "lists_over_arrays": round(lists / arrays, 1), "same_examples": as_lists == examples}))
  with tempfile.TemporaryDirectory() as tmp:
    path, array = os.path.join(tmp, "rows.jsonl"), os.path.join(tmp, "rows.json")
    with open(path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in data)
    with open(array, "w") as f:
      json.dump(data, f, indent=1)
    datasets.Dataset.from_list(data).save_to_disk(os.path.join(tmp, "ds"))
    for kind, src in (("jsonl", path), ("json_array", array),
                      ("save_to_disk", os.path.join(tmp, "ds"))):
      t = time.perf_counter()
      _, loaded = preference.load_rows(src)
      load = time.perf_counter() - t
      _ = [loaded[j] for j in range(0, len(loaded), 2)]
      half = time.perf_counter() - t - load
      (_, loaded), lazy, _ = held(lambda: preference.load_rows(src))   # noqa: B023
      t = time.perf_counter()
      every = list(loaded)
      convert = time.perf_counter() - t
      del every
      _, dicts, _ = held(lambda: list(loaded))   # noqa: B023
      print(json.dumps({
          "rows": n, "source": kind, "file_bytes": os.path.getsize(src) if kind != "save_to_disk"
          else None, "load_seconds": round(load, 3), "half_the_rows_seconds": round(half, 3),
          "held_bytes": lazy, "all_rows_as_dicts_bytes": dicts,
          "all_rows_as_dicts_seconds": round(convert, 3)}))
    # a stream (data.streaming=True on a parquet file): tokenised a round of rows at a time,
    # against the whole stream read into a list first (what load_rows did before)
    pq = os.path.join(tmp, "rows.parquet")
    datasets.Dataset.from_list(data).to_parquet(pq)
    stream = {"rows": n, "source": "parquet, streaming=True"}
    next(iter(preference.load_rows(pq, streaming=True)[1]))   # imports outside the traced part
    # what datasets holds while it streams the file, without tokenising
    _, _, stream["iterate_only_peak_bytes"] = held(lambda: sum(
        1 for _ in preference.load_rows(pq, streaming=True)[1]))   # noqa: B023
    for kind, make in (("streamed", lambda: preference.load_rows(pq, streaming=True)[1]),
                       ("read_into_a_list", lambda: list(
                           preference.load_rows(pq, streaming=True)[1]))):
      t = time.perf_counter()
      (streamed, _), _, peak = held(lambda: preference.tokenize_cached(   # noqa: B023
          None, make(), tok, opts, "bench"))   # noqa: B023
      stream[f"{kind}_tokenise_peak_bytes"] = peak
      stream[f"{kind}_seconds"] = round(time.perf_counter() - t, 3)
      stream[f"{kind}_same_examples"] = streamed == examples
    print(json.dumps(stream))
    cache = os.path.join(tmp, "data_cache")   # a rerun reads the tokenised data
    _, loaded = preference.load_rows(path)
    timing = {}
    for run in ("tokenise_and_write", "read"):
      t = time.perf_counter()
      preference.tokenize_cached(cache, loaded, tok, opts, "bench")
      timing[f"{run}_seconds"] = round(time.perf_counter() - t, 3)
    [name] = os.listdir(cache)
    # the peak while tokenising into a new cache (traced, so timed apart from the run above)
    (written, _), _, write_peak = held(lambda: preference.tokenize_cached(   # noqa: B023
        os.path.join(tmp, "peak_cache"), loaded, tok, opts, "bench"))
    print(json.dumps({"rows": n, "cache": "W/data_cache", **timing,
                      "cache_file_bytes": os.path.getsize(os.path.join(cache, name)),
                      "tokenise_and_write_peak_bytes": write_peak,
                      "tokenise_and_write_peak_bytes_per_token": round(
                          write_peak / written.tokens.size, 2)}))
    print(json.dumps({"rows": n, "cache_held_by": "processes on one host",
                      **shared(os.path.join(cache, name), processes)}))


if __name__ == "__main__":
  main()
