"""A built-in byte-level tokenizer with a chat template; nothing to download.

It is a real `transformers.PreTrainedTokenizerFast` (256 byte tokens + 8 special tokens), so the
same data path serves it and any Hugging Face tokenizer, and it is saved with exported models.
"""
from __future__ import annotations

import functools

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>",
            "<|unk|>", "<|sep|>"]
VOCAB_SIZE = 256 + len(SPECIALS)   # = 264, models.TINY.vocab_size

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|eos|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


@functools.lru_cache(maxsize=1)
def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  byte_to_unicode = sorted(alphabet)   # deterministic order of the 256 byte symbols
  vocab = {s: i for i, s in enumerate(byte_to_unicode)}
  for i, s in enumerate(SPECIALS):
    vocab[s] = 256 + i
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(SPECIALS)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
      unk_token="<|unk|>", chat_template=CHAT_TEMPLATE)
  assert len(fast) == VOCAB_SIZE, len(fast)
  return fast
