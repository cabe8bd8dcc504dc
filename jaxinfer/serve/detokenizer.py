"""Incremental detokenization: text deltas as tokens arrive, never half a UTF-8 character.

Byte-level tokenizers split a character over several tokens; decoding a token alone gives U+FFFD. Each call
decodes a short window twice (from the start of the last emitted chunk up to where text was last emitted,
and up to the newest token) and emits the difference, but only once it no longer ends in U+FFFD (an
incomplete character); the window then starts at the chunk just emitted, so the work per token stays small. `flush()` emits whatever
is left at the end (a genuinely invalid byte sequence then appears as U+FFFD, as a full decode shows it).
Decoding over a window rather than token by token also keeps tokenizers that merge spaces at token boundaries
(SentencePiece's "▁") correct.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
  def __init__(self, tokenizer, skip_ids=()):
    self.tokenizer = tokenizer
    self.skip = frozenset(skip_ids)  # e.g. the eos token: never part of the text
    self.ids: list[int] = []
    self.prefix = 0  # window start
    self.read = 0  # tokens whose text has been emitted

  def _decode(self, ids) -> str:
    return self.tokenizer.decode(ids)

  def add(self, token_ids) -> str:
    """The new text that the tokens complete ("" while a character is still incomplete)."""
    self.ids.extend(t for t in token_ids if t not in self.skip)
    if len(self.ids) == self.read:
      return ""
    before = self._decode(self.ids[self.prefix:self.read])
    text = self._decode(self.ids[self.prefix:])
    if len(text) <= len(before) or text.endswith(REPLACEMENT):
      return ""
    self.prefix = self.read  # the next window starts at the chunk just emitted (its context)
    self.read = len(self.ids)
    return text[len(before):]

  def flush(self) -> str:
    """What is still held back (an incomplete trailing character), as a full decode would show it."""
    if len(self.ids) == self.read:
      return ""
    before = self._decode(self.ids[self.prefix:self.read])
    text = self._decode(self.ids[self.prefix:])
    self.read = len(self.ids)
    return text[len(before):]
