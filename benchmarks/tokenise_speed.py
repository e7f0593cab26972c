"""Tokenising speed: preference.tokenize_rows on chat rows, rows encoded one at a time
(`ENCODE_BLOCK = 1`) against a block of rows in one batched tokenizer call (the default, a fast
tokenizer spreads a batch over its threads), best of `--rounds` alternating rounds.

Two tokenizers: benchmarks/example_memory.py's word-level one (50,000 words, cheap to encode),
and a byte-level BPE with an 8,000-token vocabulary trained here on the same kind of text
(closer to the cost of a real tokenizer's encoding).

    python benchmarks/tokenise_speed.py [--rows 2000] [--rounds 3]   # one JSON line a tokenizer
"""
import argparse
import json
import time

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import example_memory
from dpo_jax.data import preference


def bpe(texts) -> transformers.PreTrainedTokenizerFast:
  specials = ["<pad>", "<s>", "</s>", "<unk>"]
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8000, special_tokens=specials,
                                                     show_progress=False))
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
      unk_token="<unk>", chat_template=example_memory.TEMPLATE)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rows", type=int, default=2000)
  ap.add_argument("--rounds", type=int, default=3)
  args = ap.parse_args()
  data = example_memory.rows(args.rows)
  texts = [m["content"] for r in data[:500] for k in ("prompt", "chosen", "rejected")
           for m in r[k]]
  opts = preference.TokenizeOptions(1024, 512)
  default = preference.ENCODE_BLOCK
  for name, tok in (("word-level", example_memory.tokenizer()), ("byte-level BPE", bpe(texts))):
    best, out = {}, {}
    for _ in range(args.rounds):
      for block in (1, default):
        preference.ENCODE_BLOCK = block
        t = time.perf_counter()
        out[block] = preference.tokenize_rows(data, tok, opts, "bench")
        best[block] = min(best.get(block, float("inf")), time.perf_counter() - t)
    preference.ENCODE_BLOCK = default
    assert out[1] == out[default]
    print(json.dumps({"tokenizer": name, "rows": args.rows, "tokens": int(out[1][0].tokens.size),
                      "one_row_a_call_seconds": round(best[1], 3),
                      f"{default}_rows_a_call_seconds": round(best[default], 3),
                      "speedup": round(best[1] / best[default], 2)}))


if __name__ == "__main__":
  main()
