"""KV policies with speculative verification (kv_policies/speculative.py, EvictionPolicy.on_verified):
greedy ngram / draft speculation under streaming and SnapKV gives the tokens of the same policy without
speculation (several requests, chunked prefill, prefix caching, random arrivals, forced preemption); H2O with
speculation against a dense replay that masks exactly the set each row saw; a long streaming + ngram stream
in a fixed number of pages (and rollbacks the policy refuses); the config's refusals."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxinfer
from jaxinfer.config.schema import ConfigError
from jaxinfer.engine import EngineConfig
from jaxinfer.engine.request import RequestRejected
from jaxinfer.engine.kv_policies import KVPolicyConfig
from jaxinfer.engine.kv_policies import reference as R
from jaxinfer.engine.kv_policies.device import kept_positions
from testlib import tiny_model_config

PS = 8
SHAPE = dict(max_batch_size=3, page_size=PS, max_step_tokens=24, min_token_bucket=24, min_seq_bucket=4,
             max_model_len=160, async_scheduling=False)
POLICIES = {
    "streaming": dict(name="streaming", sink_tokens=4, window=12),
    "snapkv": dict(name="snapkv", window=6, budget=20),
    "h2o": dict(name="h2o", window=6, budget=20),
}


@pytest.fixture(scope="module")
def model():
  return jaxinfer.Transformer(tiny_model_config(dtype="float32", max_position_embeddings=1024), rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def small(model):
  cfg = tiny_model_config(dtype="float32", max_position_embeddings=1024, num_layers=1, hidden_size=32,
                          intermediate_size=64)
  return jaxinfer.Transformer(cfg, rngs=nnx.Rngs(5))


def _spec(method, model, small, k=3):
  if method == "ngram":
    return jaxinfer.SpeculativeConfig(method="ngram", num_speculative_tokens=k, ngram_max=3, ngram_min=1)
  return jaxinfer.SpeculativeConfig(method="draft", num_speculative_tokens=k,
                                    draft_model=model if method == "draft-same" else small)


def _prompts(rng, n, vocab):
  """Prompts longer than a step (chunked prefill), half repetitive (prompt lookup finds n-grams), some
  sharing a prefix (prefix caching)."""
  prefix = rng.integers(1, vocab, size=2 * PS).tolist()  # page-aligned (copy-on-write has its own test)
  out = []
  for i in range(n):
    unit = rng.integers(1, vocab, size=int(rng.integers(2, 5))).tolist()
    own = unit * int(rng.integers(5, 9)) if i % 2 else rng.integers(1, vocab, size=14).tolist()
    out.append((prefix if i % 3 else rng.integers(1, vocab, size=9).tolist()) + own)
  return out


def _drive(engine, prompts, news, rng, may_preempt):
  """Random arrivals and forced preemptions (of requests may_preempt allows), pages checked every step."""
  index_of, got, arrived, steps = {}, {}, 0, 0
  while arrived < len(prompts) or engine.has_unfinished():
    if arrived < len(prompts) and rng.random() < 0.5:
      index_of[engine.add_request(prompts[arrived], max_new_tokens=news[arrived])] = arrived
      arrived += 1
    running = [r for r in engine.scheduler.running if may_preempt(r)]
    if engine.num_running > 1 and running and (rng.random() < 0.2 or not engine.stats["preemptions"]):
      engine.preempt(running[int(rng.integers(0, len(running)))].request_id)
    for out in engine.step():
      got.setdefault(index_of[out.request_id], []).extend(out.new_token_ids)
    engine.check_pages()
    steps += 1
    assert steps < 400, "no progress"
  return [got.get(i, []) for i in range(len(prompts))]


CASES = [("streaming", "ngram"), ("snapkv", "ngram"), ("streaming", "draft-small"), ("snapkv", "draft-same")]
ACCEPTED = {"ngram": 1, "draft-small": 0, "draft-same": 20}


@pytest.mark.parametrize("policy,method", CASES)
def test_speculation_keeps_the_policy_tokens(model, small, policy, method):
  rng = np.random.default_rng(len(policy) * 7 + len(method))
  kv = KVPolicyConfig(**POLICIES[policy])
  prompts = _prompts(rng, 4, model.config.vocab_size)
  news = [int(k) for k in rng.integers(16, 28, size=len(prompts))]
  plain = jaxinfer.Engine(model, kv_policy=kv, enable_prefix_caching=True, **SHAPE)
  want = [plain.run([p], max_new_tokens=k, progress=False)[0] for p, k in zip(prompts, news)]
  engine = jaxinfer.Engine(model, kv_policy=kv, enable_prefix_caching=True, speculative=_spec(method, model, small),
                           **SHAPE)
  # SnapKV selects at the end of what it prefills: a request preempted after its first token would select
  # again over prompt + generated tokens (in both runs alike, but at other points); preempt it mid-prompt only
  may_preempt = (lambda r: True) if policy == "streaming" else (lambda r: not r.output)
  got = _drive(engine, prompts, news, rng, may_preempt)
  assert got == want
  st, pst = engine.stats, engine.kv_policy.stats
  # drafts verified; accepted: some with prompt lookup (a random tiny model rarely follows the prompt's
  # n-grams), most with the target as its own draft (its engine runs the same policy); the small draft is
  # there for its rejections, rolled back
  assert st["spec_draft_tokens"] >= 30 and st["spec_accepted_tokens"] >= ACCEPTED[method], st
  assert pst["rollback_slots"] >= (0 if method == "draft-same" else 10), pst
  assert pst["evicted_pages"] > 0 and engine.check_pages()["in_use"] == 0
  assert st["preemptions"] > 0 and engine.prefix_stats["hit_tokens"] > 0
  assert max(engine.kv_policy.max_pages.values()) <= engine.pages_per_seq


def _record(engine, prompt, new):
  """Greedy steps of one request; per step the rows it kept and what they saw: (first row, end, positions
  each (layer, kv head) held before the step)."""
  rid = engine.add_request(prompt, max_new_tokens=new)
  out, steps = [], []
  while engine.has_unfinished():
    r = engine._requests[rid]
    before = r.num_computed
    held = engine.kv_policy.held.get(rid, 0)
    pos = kept_positions(engine.runner.pool, r.pages, held) if held else None
    for o in engine.step():
      out += o.new_token_ids
    after = r.num_computed if rid in engine._requests else len(prompt) + len(out) - 1
    steps.append((before, after, pos))
  return out, steps


def _replay_visibility(n, layers, kv_heads, steps):
  """vis[layer, row, head, key]: row i (kept from the step that computed it) sees what its heads held before
  that step and the step's own tokens up to i."""
  vis = np.broadcast_to(np.tril(np.ones((n, n), bool))[:, None, :], (layers, n, kv_heads, n)).copy()
  for before, after, pos in steps:
    for i in range(before, min(after, n)):
      vis[:, i] = False
      vis[:, i, :, before:i + 1] = True
      if pos is not None:
        for layer in range(layers):
          for h in range(kv_heads):
            p = pos[layer, h]
            vis[layer, i, h, p[p >= 0]] = True
  return vis


@pytest.mark.parametrize("method", ["ngram", "draft-same"])
def test_h2o_speculation_matches_dense_replay(model, small, method):
  cfg = model.config
  kv = KVPolicyConfig(**POLICIES["h2o"])
  rng = np.random.default_rng(4)
  unit = rng.integers(1, cfg.vocab_size, size=3).tolist()
  prompt = rng.integers(1, cfg.vocab_size, size=20).tolist() + unit * 6
  engine = jaxinfer.Engine(model, kv_policy=kv, speculative=_spec(method, model, small), **SHAPE)
  out, steps = _record(engine, prompt, 30)
  tokens = prompt + out
  n = len(tokens)
  vis = _replay_visibility(n, cfg.num_layers, cfg.num_kv_heads, steps)
  seen = vis[:, len(prompt):n - 1].sum(-1).max(axis=(0, 2))
  assert seen.max() <= kv.budget + 1 + 3 and seen.max() < n - 10  # within the budget + the step's tokens
  logits = R.masked_logits(model, tokens, vis)
  assert out == logits[len(prompt) - 1:n - 1].argmax(-1).tolist()
  st, pst = engine.stats, engine.kv_policy.stats
  assert st["spec_accepted_tokens"] > 0 and pst["rollback_slots"] > 0 and pst["compactions"] >= 2, (st, pst)
  # the verification steps took in several tokens at once and evicted one slot per token over the budget:
  # every head holds exactly the budget after each decode step
  held = [(p >= 0).sum(-1) for b, a, p in steps if p is not None and b >= len(prompt) + 1]
  assert held and all((h == kv.budget).all() for h in held)
  engine.check_pages()
  _check_victims(model, tokens, vis, steps, len(prompt), kv)


def _check_victims(model, tokens, vis, steps, prompt_len, kv):
  """H2O's eviction rule after each decode step, from the replay's own attention: the mass of a slot is what
  the rows that score (prefill rows and each step's own-token row, not drafts) gave it; the slots a step drops
  are the (new tokens over the budget) lightest of those older than the window of the newest kept token."""
  cfg = model.config
  graphdef, state = nnx.split(model)
  cache = R.MaskedDenseCache(vis=jnp.asarray(vis), model_config=cfg)
  probs = np.stack([np.asarray(p) for p in R._forward(nnx.merge(graphdef, state), tokens, cache)[1].probs])
  n, hkv = len(tokens), cfg.num_kv_heads
  group = probs.reshape(cfg.num_layers, n, hkv, cfg.num_heads // hkv, n).sum(3)  # [layer, query, kv head, key]
  scoring = np.arange(n) < prompt_len
  checked = 0
  for (before, after, pos), (_, _, nxt) in zip(steps[:-1], steps[1:]):
    if before < prompt_len:
      continue
    scoring[before] = True
    mass = (group * scoring[None, :, None, None]).sum(1)  # [layer, kv head, key]
    for layer in range(cfg.num_layers):
      for h in range(hkv):
        cand = set(pos[layer, h][pos[layer, h] >= 0].tolist()) | set(range(before, after))
        left = set(nxt[layer, h][nxt[layer, h] >= 0].tolist())
        gone = cand - left
        assert left <= cand and len(gone) == max(0, len(cand) - kv.budget), (before, after, layer, h)
        old = {j for j in cand if j <= after - 1 - kv.window}
        if gone:
          assert gone <= old
          survivors = sorted(old - gone)
          assert max(mass[layer, h, sorted(gone)]) <= min(mass[layer, h, survivors]) + 1e-4, (before, layer, h)
          checked += 1
  assert checked >= 10


def test_long_streaming_ngram_stream_in_fixed_pages(model):
  kv = KVPolicyConfig(name="streaming", sink_tokens=4, window=16)
  step = 32
  engine = jaxinfer.Engine(model, kv_policy=kv, speculative=jaxinfer.SpeculativeConfig(num_speculative_tokens=4),
                           max_batch_size=1, page_size=PS, max_step_tokens=step, min_token_bucket=step,
                           max_model_len=1024, num_pages=16, async_scheduling=False)
  bound = engine.pages_per_seq  # sink page + window, 2 * 4 rollback/draft tokens and one step + 1
  assert bound == 1 + -(-(16 + 8 + step) // PS) + 1 < 1024 // PS
  rng = np.random.default_rng(8)
  unit = rng.integers(1, model.config.vocab_size, size=5).tolist()
  prompt = rng.integers(1, model.config.vocab_size, size=30).tolist() + unit * 74  # 400 tokens
  rid = engine.add_request(prompt, max_new_tokens=40)
  used, out, rid_done = [], [], None
  while engine.has_unfinished():
    for o in engine.step():
      out += o.new_token_ids
    used.append(engine.check_pages()["in_use"])
    r = engine._requests.get(rid)
    if r is not None and len(r.output) >= 20 and engine.kv_policy.needed_from.get(rid):
      # a rollback past what the dropped pages allow is refused, nothing changed; a short one is fine
      with pytest.raises(RequestRejected, match="already dropped a page"):
        engine.rollback(rid, 19)
      assert engine.rollback(rid, 2) >= 0 and len(r.output) >= 18
      rid_done = rid
      rid = None  # once
  assert engine.stats["preemptions"] == 0 and rid is None and rid_done is not None
  assert max(used) <= bound and engine.kv_policy.max_pages[rid_done] <= bound
  assert engine.kv_policy.stats["evicted_pages"] >= (400 - 16 - 2 * step) // PS
  assert engine.stats["spec_accepted_tokens"] > 0


def test_refusals_name_the_field(model):
  streaming = KVPolicyConfig(**POLICIES["streaming"])
  medusa = jaxinfer.SpeculativeConfig(method="medusa", medusa_heads="unused", num_speculative_tokens=3)
  with pytest.raises(ConfigError, match=r"^engine\.kv_policy\.name: kv_policy 'streaming' does not run with tree "
                                        r"verification \(speculative\.method='medusa'\)"):
    EngineConfig(kv_policy=streaming, speculative=medusa)
  duo = KVPolicyConfig(name="duo", sink_tokens=4, window=12, head_classes=("rs", "sr"))
  with pytest.raises(ConfigError, match=r"^engine\.kv_policy\.name: kv_policy 'duo' does not run with speculative "
                                        r"verification .*: its streaming heads' sinks \+ window store"):
    EngineConfig(kv_policy=duo, speculative=jaxinfer.SpeculativeConfig())
  with pytest.raises(ConfigError, match=r"^engine\.kv_policy\.name: kv_policy 'duo'"):
    EngineConfig(kv_policy=duo, max_rows_per_seq=2)
  for name in ("h2o", "snapkv", "h2o_wide"):
    small_window = KVPolicyConfig(name=name, window=4, budget=20)
    with pytest.raises(ConfigError, match=rf"^engine\.kv_policy\.window: {name} with up to k=4 drafts per step "
                                          r"needs window > k, got window=4"):
      EngineConfig(kv_policy=small_window, speculative=jaxinfer.SpeculativeConfig(num_speculative_tokens=4))
  with pytest.raises(ConfigError, match=r"^engine\.kv_policy\.name: kv_policy 'streaming' runs with speculative "
                                        r"verification or with shared-prefix attention, not with both"):
    EngineConfig(kv_policy=streaming, speculative=jaxinfer.SpeculativeConfig(), enable_prefix_caching=True,
                 enable_shared_prefix_attention=True)
  # what is allowed builds
  EngineConfig(kv_policy=KVPolicyConfig(name="h2o", window=5, budget=20), max_rows_per_seq=5)
  EngineConfig(kv_policy=streaming, speculative=jaxinfer.SpeculativeConfig(num_speculative_tokens=8))
