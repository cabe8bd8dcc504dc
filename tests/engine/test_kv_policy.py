"""KV policies (jaxinfer/engine/kv_policies): each against a dense reference that masks exactly what the
policy kept (greedy tokens identical, float32 tiny model), the scoring of SnapKV and H2O against plain-NumPy
references written from the papers, config errors, and a 10,000-token stream in a fixed number of pages."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import jaxinfer
from jaxinfer.config.schema import ConfigError
from jaxinfer.engine.kv_policies import KVPolicyConfig
from jaxinfer.engine.kv_policies import device as D
from jaxinfer.engine.kv_policies import reference as R
from jaxinfer.engine.kv_policies.attention import MaskRule, masked_probs, visibility
from jaxinfer.engine.kv_policies.device import kept_positions
from testlib import tiny_model_config

PS, STEP = 8, 16


@pytest.fixture(scope="module")
def model():
  return jaxinfer.Transformer(tiny_model_config(dtype="float32", max_position_embeddings=10240), rngs=nnx.Rngs(3))


def _engine(model, policy, **kw):
  kw = dict(max_batch_size=2, page_size=PS, max_step_tokens=STEP, min_token_bucket=STEP, max_model_len=256,
            async_scheduling=False, kv_policy=policy) | kw
  return jaxinfer.Engine(model, **kw)


def _run_recording(engine, prompt, new):
  """Greedy generation step by step; after each step the positions each (layer, kv head) still holds."""
  rid = engine.add_request(prompt, max_new_tokens=new)
  out, kept = [], []
  while engine.has_unfinished():
    request = engine._requests.get(rid)
    for o in engine.step():
      out += o.new_token_ids
    request = engine._requests.get(rid)
    if request is not None:
      kept.append((request.num_computed, kept_positions(engine.runner.pool, request.pages,
                                                        engine.kv_policy.held[rid])))
  return out, kept


def _recorded_visibility(n, layers, kv_heads, prompt_len, kept):
  """Prompt queries: causal (prefill is dense); decode query i: what was held after the step before it, and i."""
  vis = np.broadcast_to(np.tril(np.ones((n, n), bool))[:, None, :], (layers, n, kv_heads, n)).copy()
  for computed, pos in kept:
    i = computed  # the next query
    if i < prompt_len or i >= n:
      continue
    vis[:, i] = False
    for layer in range(layers):
      for h in range(kv_heads):
        p = pos[layer, h]
        vis[layer, i, h, p[p >= 0]] = True
    vis[:, i, :, i] = True
  return vis


CASES = {
    "streaming": dict(name="streaming", sink_tokens=4, window=12),
    "streaming-cache": dict(name="streaming", sink_tokens=4, window=12, positions="cache"),
    "snapkv": dict(name="snapkv", window=8, budget=24),
    "h2o": dict(name="h2o", window=6, budget=20),
    "duo_masked": dict(name="duo_masked", sink_tokens=4, window=12, head_classes=("rs", "sr")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_policy_matches_dense_reference(model, case):
  cfg = model.config
  policy = KVPolicyConfig(**CASES[case])
  prompt = np.random.default_rng(len(case)).integers(1, cfg.vocab_size, 37).tolist()
  engine = _engine(model, policy)
  out, kept = _run_recording(engine, prompt, 18)
  tokens = prompt + out
  n, layers, hkv = len(tokens), cfg.num_layers, cfg.num_kv_heads
  shift = None
  if policy.name in ("streaming", "duo_masked"):
    heads = None if policy.name == "streaming" else [[c == "s" for c in row] for row in policy.head_classes]
    vis = R.streaming_visibility(n, layers, hkv, policy.sink_tokens, policy.window, heads)
    if policy.positions == "cache":
      shift = R.cache_sink_shift(n, policy.sink_tokens, policy.window)
  else:
    vis = _recorded_visibility(n, layers, hkv, len(prompt), kept)
    seen = vis[:, len(prompt):n - 1].sum(-1).max(axis=(0, 2))  # keys seen by each decode query (the last runs never)
    grown = np.arange(seen.size) if policy.name == "snapkv" else 0  # SnapKV prunes the prompt only
    assert (seen <= policy.budget + 1 + grown).all() and seen.max() < n
  logits = R.masked_logits(model, tokens, vis, sinks=policy.sink_tokens, sink_shift=shift)
  want = logits[len(prompt) - 1:n - 1].argmax(-1).tolist()
  assert out == want
  # and the policy did change something: full attention decodes differently or sees more keys
  full = R.masked_logits(model, tokens, np.broadcast_to(np.tril(np.ones((n, n), bool))[:, None, :],
                                                        (layers, n, hkv, n)))
  assert np.abs(full - logits)[len(prompt):].max() > 1e-3
  engine.check_pages()


def test_snapkv_with_prefix_caching(model):
  """Composition: a repeated prompt reuses the pages computed before the observation window (and only those:
  compacted pages are never named), and decodes exactly as the first time."""
  policy = KVPolicyConfig(**CASES["snapkv"])
  engine = _engine(model, policy, enable_prefix_caching=True)
  prompt = np.random.default_rng(9).integers(1, model.config.vocab_size, 37).tolist()
  first = engine.run([prompt], max_new_tokens=6, progress=False)[0]
  second = engine.run([prompt], max_new_tokens=6, progress=False)[0]
  assert first == second
  stats = engine.prefix_stats
  assert stats["hit_tokens"] == (37 - policy.window) // PS * PS and engine.kv_policy.stats["compactions"] == 2
  engine.check_pages()


def test_snapkv_scoring_matches_numpy():
  rng = np.random.default_rng(0)
  n, w, budget, kernel, heads, hkv, d = 40, 6, 16, 5, 4, 2, 8
  q = rng.standard_normal((w, heads, d)).astype(np.float32)
  k = rng.standard_normal((n, hkv, d)).astype(np.float32)
  # numpy, from the paper: C = sum over observation queries (and the group's heads) of softmax(q K^T / sqrt(d))
  # over the prefix; pooled with max_pool1d(kernel, padding kernel // 2); top budget - w prefix positions + window
  g = heads // hkv
  qpos = np.arange(n - w, n)
  logits = np.einsum("thd,khd->thk", q.reshape(w, hkv, g, d).reshape(w, heads, d),
                     np.repeat(k, g, axis=1)) / np.sqrt(d)
  logits = np.where(np.arange(n)[None, None, :] <= qpos[:, None, None], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  votes = p.sum(0).reshape(hkv, g, n).sum(1)[:, :n - w]  # [hkv, prefix]
  padded = np.pad(votes, ((0, 0), (kernel // 2, kernel // 2)), constant_values=-np.inf)
  pooled = np.stack([padded[:, i:i + n - w] for i in range(kernel)]).max(0)
  want = [sorted(np.argsort(-pooled[h], kind="stable")[:budget - w].tolist() + list(range(n - w, n)))
          for h in range(hkv)]
  # jaxinfer: the attention pass's probabilities, summed as the engine's score row, then snapkv_select
  key_pos = np.broadcast_to(np.arange(n)[None, :, None], (w, n, hkv)).astype(np.int32)
  rule = MaskRule(scores=True)
  vis = visibility(key_pos, qpos.astype(np.int32), np.full((w,), n, np.int32), rule, 0)
  probs = masked_probs(q, np.broadcast_to(k[None], (w, n, hkv, d)), key_pos, qpos, vis, rule, 0)
  score = np.asarray(probs).sum(axis=(0, 2)).T  # [n, hkv]
  score = np.concatenate([score, rng.standard_normal((8, hkv)).astype(np.float32)])  # slots past held ignored
  got = np.asarray(D.snapkv_select(score, None, n, None, window=w, kernel=kernel, keep=budget)).T
  assert got.tolist() == want


def test_h2o_scoring_matches_numpy():
  rng = np.random.default_rng(1)
  n, budget, window, hkv, g, d = 30, 10, 3, 2, 2, 8
  q = rng.standard_normal((n, hkv * g, d)).astype(np.float32)
  k = rng.standard_normal((n, hkv, d)).astype(np.float32)
  # numpy, from the paper: every step the new key joins, the query's attention over the kept keys adds to each
  # key's accumulated score, and past the budget the lowest-scoring key outside the recent window is evicted
  want = []
  for h in range(hkv):
    kept, acc = [], np.zeros(n)
    for i in range(n):
      kept.append(i)
      s = np.stack([q[i, h * g + x] @ k[kept, h].T for x in range(g)]) / np.sqrt(d)
      p = np.exp(s - s.max(-1, keepdims=True))
      acc[kept] += (p / p.sum(-1, keepdims=True)).sum(0)
      if len(kept) > budget:
        old = [j for j in kept if j <= i - window]
        kept.remove(min(old, key=lambda j: (acc[j], j)))
    want.append(sorted(kept))
  # jaxinfer: masked_probs over the slots held (position -1: evicted), scores accumulated, h2o_victim
  slot_pos = np.full((n, hkv), -1, np.int32)
  score = np.zeros((n, hkv), np.float32)
  rule = MaskRule(scores=True)
  for i in range(n):
    slot_pos[i] = i
    key_pos = slot_pos[None]
    vis = visibility(key_pos, np.array([i], np.int32), np.array([i + 1], np.int32), rule, 0)
    probs = masked_probs(q[i:i + 1], k[None], key_pos, np.array([i], np.int32), vis, rule, 0)
    score += np.asarray(probs)[0].sum(1).T
    if (slot_pos >= 0).sum(0).max() > budget:
      victim, any_old = D.h2o_victim(score, slot_pos, i + 1, i, window)
      for h in range(hkv):
        assert bool(any_old[h])
        slot_pos[int(victim[h]), h] = -1
        score[int(victim[h]), h] = 0.0
  got = [sorted(np.flatnonzero(slot_pos[:, h] >= 0).tolist()) for h in range(hkv)]
  assert got == want


def test_streaming_10000_tokens_in_fixed_pages(model):
  policy = KVPolicyConfig(name="streaming", sink_tokens=4, window=32)
  step = 256
  engine = _engine(model, policy, max_step_tokens=step, min_token_bucket=step, page_size=16, num_pages=24,
                   max_model_len=10240, max_batch_size=1)
  bound = engine.pages_per_seq  # sinks' page + the window's and one step's pages + 1
  assert bound == 1 + -(-(32 + step) // 16) + 1
  prompt = np.random.default_rng(2).integers(1, model.config.vocab_size, 9990).tolist()
  rid = engine.add_request(prompt, max_new_tokens=10)
  used, out = [], []
  while engine.has_unfinished():
    for o in engine.step():
      out += o.new_token_ids
    used.append(engine.check_pages()["in_use"])
  assert len(out) == 10 and engine.stats["preemptions"] == 0
  assert max(used) <= bound and engine.kv_policy.max_pages[rid] <= bound
  assert engine.kv_policy.stats["evicted_pages"] >= (10000 - 32 - 2 * step) // 16


@pytest.mark.parametrize("field,value", [("name", "lru"), ("window", 0), ("positions", "rope"), ("pool_kernel", 4),
                                         ("retrieval_heads", 1.5), ("head_classes", ("rx",))])
def test_config_errors_name_the_field(field, value):
  with pytest.raises(ConfigError, match=rf"^engine\.kv_policy\.{field}: "):
    KVPolicyConfig(**{field: value})


def test_config_section_and_duo_needs_classes(model):
  from jaxinfer.config.schema import from_section
  from jaxinfer.engine.config import EngineConfig

  ec = from_section(EngineConfig, {"kv_policy": {"name": "snapkv", "budget": 32, "window": 8}}, "engine")
  assert ec.kv_policy == KVPolicyConfig(name="snapkv", budget=32, window=8)
  with pytest.raises(ConfigError, match=r"^engine\.kv_policy\.window: "):
    from_section(EngineConfig, {"kv_policy": {"name": "h2o", "budget": 8, "window": 8}}, "engine")
  with pytest.raises(ConfigError, match=r"^engine\.kv_policy\.head_classes: "):
    _engine(model, KVPolicyConfig(name="duo"))
