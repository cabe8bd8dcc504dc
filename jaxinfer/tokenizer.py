"""Text <-> token ids: a tokenizers.Tokenizer when the checkpoint has one, else raw UTF-8 bytes."""

from __future__ import annotations

from pathlib import Path


class ByteTokenizer:
  """Token id = byte value; used for models without tokenizer.json (needs vocab_size >= 256)."""

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids) -> str:
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text).ids

  def decode(self, ids) -> str:
    return self.tokenizer.decode(list(ids))


def tokenizer_for(checkpoint: str | None, vocab_size: int):
  from jaxinfer.checkpoint.hf import load_tokenizer

  if checkpoint and (Path(checkpoint) / "tokenizer.json").is_file():
    return HFTokenizer(load_tokenizer(checkpoint))
  if vocab_size < 256:
    raise ValueError(f"no tokenizer.json and vocab_size={vocab_size} < 256: cannot fall back to bytes")
  return ByteTokenizer()
