"""Checks one request against the engine's limits before anything is queued (bad input names input and limit)."""

from __future__ import annotations

import numpy as np

from jaxinfer.engine.request import RequestRejected
from jaxinfer.generation.sampling import SamplingParams


def check_request(prompt_ids, sampling, max_new_tokens, stop_token_ids, *, vocab: int, max_model_len: int,
                  num_pages: int, page_size: int, name: str = "prompt", pages_needed=None):
  """Returns (prompt list, sampling, max_new_tokens, stop set) or raises RequestRejected."""
  try:
    ids = np.asarray(prompt_ids)
  except Exception as e:  # ragged nested lists and the like
    raise RequestRejected(f"{name}: not a sequence of token ids ({e})") from None
  if ids.ndim != 1 or ids.size == 0:
    raise RequestRejected(f"{name}: must be a non-empty 1-D sequence of token ids, got shape {ids.shape}")
  if not np.issubdtype(ids.dtype, np.integer):
    raise RequestRejected(f"{name}: token ids must be integers, got dtype {ids.dtype}")
  bad = ids[(ids < 0) | (ids >= vocab)]
  if bad.size:
    raise RequestRejected(f"{name}: token id {int(bad[0])} is outside the vocabulary [0, {vocab})")
  n = int(ids.size)
  if n >= max_model_len:
    raise RequestRejected(f"{name}: length {n} leaves no room to generate: the maximum context (max_model_len) "
                          f"is {max_model_len} tokens")
  if max_new_tokens is None:  # as many as the context and the pool allow
    max_new_tokens = max(1, min(max_model_len, num_pages * page_size) - n)
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise RequestRejected(f"{name}: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  if n + max_new_tokens > max_model_len:
    raise RequestRejected(f"{name}: length {n} + max_new_tokens {max_new_tokens} = {n + max_new_tokens} exceeds "
                          f"the maximum context (max_model_len) of {max_model_len} tokens")
  pages = -(-(n + max_new_tokens) // page_size)
  if pages_needed is not None:  # a KV policy that bounds a request's pages (StreamingLLM)
    pages = pages_needed(n + max_new_tokens)
  if pages > num_pages:
    raise RequestRejected(f"{name}: {n} + {max_new_tokens} tokens need {pages} pages of {page_size}, but the "
                          f"pool only has num_pages={num_pages}: it could never fit")
  sampling = SamplingParams() if sampling is None else sampling
  if not isinstance(sampling, SamplingParams):
    raise RequestRejected(f"{name}: sampling must be a SamplingParams, got {type(sampling).__name__}")
  if not 0 <= sampling.seed < 2**32:
    raise RequestRejected(f"{name}: sampling.seed must be in [0, 2**32), got {sampling.seed}")
  stops = frozenset(int(t) for t in stop_token_ids)
  bad_stops = sorted(t for t in stops if not 0 <= t < vocab)
  if bad_stops:
    raise RequestRejected(f"{name}: stop token id {bad_stops[0]} is outside the vocabulary [0, {vocab})")
  return [int(t) for t in ids.tolist()], sampling, int(max_new_tokens), stops
