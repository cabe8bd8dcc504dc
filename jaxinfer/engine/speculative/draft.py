"""Draft-model proposer: a small model sharing the target's tokenizer drafts k tokens per decode, batched.

The draft runs in an engine of its own (its own paged KV pool, scheduler and step programs) with one draft
request per target request. Before each target schedule, `prepare` brings every decoding target request's
draft twin up to the target's known tokens: the draft's tokens past the longest common prefix (drafts the
target rejected) are rolled back (their pages go back to the draft pool; the draft scheduler never keeps KV
of tokens the target did not accept), the target's new tokens (a correction or bonus token) are appended and
prefilled with the next draft step. Then the draft engine steps until each twin has drafted its room of
tokens: all twins share each draft step (one draft forward per drafted position for the whole batch). At
temperature > 0 the draft engine also returns the distribution q each draft token was drawn from, which the
target's verification needs (speculative/sampling.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxinfer.config.schema import ConfigError
from jaxinfer.engine.speculative.base import Proposer
from jaxinfer.generation.sampling import SamplingParams


def _draft_seed(seed: int) -> int:
  """The draft's random stream: another seed than the target's (its draws must be independent of them)."""
  return (int(seed) * 0x9E3779B1 + 0x7F4A7C15) % (1 << 32)


def load_draft_model(draft_model, target_config):
  """A Transformer, or one loaded from an HF directory; checked against the target (same vocabulary)."""
  if isinstance(draft_model, str):
    from jaxinfer.checkpoint import load_hf

    draft_model = load_hf(draft_model)
  cfg = getattr(draft_model, "config", None)
  if cfg is None or not hasattr(cfg, "vocab_size"):
    raise ConfigError(f"engine.speculative.draft_model: not a jaxinfer model or HF directory: {draft_model!r}")
  if cfg.vocab_size != target_config.vocab_size:
    raise ConfigError(f"engine.speculative.draft_model: the draft's vocab_size={cfg.vocab_size} differs from the "
                      f"target's vocab_size={target_config.vocab_size} (the draft must share the tokenizer)")
  return draft_model


class DraftProposer(Proposer):
  def __init__(self, draft_model, target_engine_config):
    from jaxinfer.engine.engine import Engine

    ec = target_engine_config
    max_len = min(ec.max_model_len, draft_model.config.max_position_embeddings)
    # the target's max_rows_per_seq (the draft never verifies anything) keeps the step programs' output size the
    # same as the target's, so a draft of the same architecture reuses the target's compiled programs
    draft_config = dataclasses.replace(
        ec, speculative=None, max_model_len=max_len, enable_prefix_caching=False,
        enable_shared_prefix_attention=False, async_scheduling=False, track_slot_positions=False, kv_dtype=None)
    self.engine = Engine(draft_model, draft_config)
    self.engine.probs_for = lambda s: s.request.sampling.temperature > 0
    self.max_len = max_len
    self._twin: dict[int, int] = {}  # target request id -> draft request id
    self._proposals: dict[int, tuple[list[int], list]] = {}  # target request id -> (tokens, distributions)
    self.draft_steps = 0  # draft engine steps run (draft forwards over the batch)

  # ------------------------------------------------------------------ twins
  def _request(self, draft_id):
    return self.engine._requests.get(draft_id)

  def _sync(self, target) -> int | None:
    """The draft twin of `target` holding exactly its known tokens; None if it cannot (context full)."""
    tokens = target.prompt + target.output
    if len(tokens) >= self.max_len:
      return None
    did = self._twin.get(target.request_id)
    d = self._request(did) if did is not None else None
    if d is not None:
      have = d.prompt + d.output
      n = min(len(have), len(tokens))
      common = next((i for i in range(n) if have[i] != tokens[i]), n)
      if common < len(d.prompt):
        self.engine.cancel(did)
        d = None
      else:
        if len(have) > common:
          d = self._rollback(did, len(have) - common)
        if d is not None:
          d.output.extend(tokens[common:])
          d.logprobs.extend([0.0] * (len(tokens) - common))
    if d is None:
      sp = target.sampling
      sampling = SamplingParams(temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p, min_p=sp.min_p,
                                seed=_draft_seed(sp.seed))
      did = self.engine.add_request(tokens, sampling=sampling, max_new_tokens=self.max_len - len(tokens))
      self._twin[target.request_id] = did
    return did

  def _rollback(self, did, n: int):
    """The twin without its n newest tokens, or None (cancelled) when its engine refuses the rollback (a KV
    policy that already dropped what the kept tokens need: the twin then starts again from the known tokens)."""
    from jaxinfer.engine.request import RequestRejected

    try:
      self.engine.rollback(did, n)
    except RequestRejected:
      self.engine.cancel(did)
      return None
    return self._request(did)

  def _budget(self, did) -> int:
    d = self._request(did)
    return self.max_len - len(d.prompt)  # its max_new_tokens when not paused

  # ------------------------------------------------------------------ Proposer
  def prepare(self, requests, rooms, live_ids) -> None:
    for tid in [t for t in self._twin if t not in live_ids]:  # target finished or cancelled: drop its twin
      did = self._twin.pop(tid)
      if self._request(did) is not None:
        self.engine.cancel(did)
    self._proposals = {}
    want: dict[int, int] = {}
    owner: dict[int, int] = {}
    for r, room in zip(requests, rooms):
      room = min(room, self.max_len - r.num_tokens)
      if room <= 0:
        continue
      did = self._sync(r)
      if did is None:
        continue
      want[did], owner[did] = room, r.request_id
      self._proposals[r.request_id] = ([], [])
    if not want:
      return
    got: dict[int, int] = {did: 0 for did in want}
    pending = max(1, max(len(self._request(d).prompt) + len(self._request(d).output) for d in want))
    cap = max(want.values()) + 2 + -(-pending // self.engine.engine_config.max_step_tokens)
    try:
      for _ in range(cap):
        active = False
        for did, room in want.items():
          d = self._request(did)
          if d is None:
            continue
          # a twin with its room drafted sits this draft step out (max_new_tokens reached: not scheduled)
          d.max_new_tokens = len(d.output) if got[did] >= room else self._budget(did)
          active |= got[did] < room
        if not active:
          break
        self.draft_steps += 1
        for out in self.engine.step():
          tid = owner.get(out.request_id)
          if tid is None or not out.new_token_ids:
            continue
          tokens, probs = self._proposals[tid]
          tokens.extend(out.new_token_ids)
          got[out.request_id] += len(out.new_token_ids)
          if out.probs is not None:
            probs.extend(out.probs)
    finally:
      for did in want:
        d = self._request(did)
        if d is not None:
          d.max_new_tokens = self._budget(did)

  def propose(self, request, max_tokens: int) -> list[int]:
    tokens, _ = self._proposals.get(request.request_id, ([], []))
    return tokens[:max_tokens]

  def draft_probs(self, request):
    _, probs = self._proposals.get(request.request_id, ([], []))
    return np.stack(probs) if probs else None
