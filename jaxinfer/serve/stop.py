"""Stop strings matched across token boundaries and trimmed from the output, as the OpenAI API does.

Text arrives in deltas; the last (longest stop string - 1) characters are held back, since they may be the
start of a stop string that the next delta completes. When a stop string appears, the text before it is
emitted, the stop string and everything after it are dropped, and the request is over.
"""

from __future__ import annotations


class StopMatcher:
  def __init__(self, stops=()):
    self.stops = tuple(s for s in stops if s)
    self.hold = max((len(s) for s in self.stops), default=1) - 1
    self.pending = ""
    self.stopped: str | None = None  # the stop string that matched

  def add(self, text: str) -> str:
    """The text that is now safe to emit (never any part of a stop string)."""
    if self.stopped is not None:
      return ""
    if not self.stops:
      return text
    buffer = self.pending + text
    # the earliest match wins (a later, longer stop string cannot come first in the output)
    found = [(i, s) for s in self.stops if (i := buffer.find(s)) >= 0]
    if found:
      index, self.stopped = min(found)
      self.pending = ""
      return buffer[:index]
    keep = min(self.hold, len(buffer))
    self.pending = buffer[len(buffer) - keep:] if keep else ""
    return buffer[:len(buffer) - keep]

  def flush(self) -> str:
    """At the end of the request (no stop string came): the held-back text."""
    out, self.pending = ("" if self.stopped is not None else self.pending), ""
    return out
