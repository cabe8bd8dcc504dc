"""KV policies with shared-prefix (Hydragen) attention: greedy tokens identical to the same policy without it,
on requests sharing a long prefix (several pages) under chunked prefill and random arrivals; sequences are
grouped only while their policy's view is the plain causal one, and leave their group once it is masked."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import jaxinfer
from jaxinfer.engine.kv_policies import KVPolicyConfig
from testlib import tiny_model_config

PS, PREFIX = 8, 24  # the shared prefix: 3 full pages
POLICIES = {
    # plain while a query's position < sinks + window = 36: prompts of 25-38 tokens decode 10 past it
    "streaming": dict(name="streaming", sink_tokens=4, window=32, positions="cache"),
    # prompts within the budget are never compacted (plain), longer ones are compacted after prefill
    "snapkv": dict(name="snapkv", window=8, budget=32),
    # every H2O row scores and H2O names no prefix pages: it runs with groups on but never joins one
    "h2o": dict(name="h2o", window=6, budget=20),
    # duo names no prefix pages and neither duo layout states a plain view: both run, never grouped
    "duo": dict(name="duo", sink_tokens=4, window=12, head_classes=("rs", "sr")),
    "duo_masked": dict(name="duo_masked", sink_tokens=4, window=12, head_classes=("rs", "sr")),
}
NEVER_GROUPED = ("h2o", "duo", "duo_masked")


@pytest.fixture(scope="module")
def model():
  return jaxinfer.Transformer(tiny_model_config(dtype="float32"), rngs=nnx.Rngs(5))


def _workload(vocab):
  rng = np.random.default_rng(7)
  prefix = rng.integers(1, vocab, PREFIX).tolist()
  suffixes = [1, 12, 3, 14, 2, 5, 9]
  prompts = [prefix + rng.integers(1, vocab, n).tolist() for n in suffixes]
  arrivals = np.sort(rng.integers(0, 12, len(prompts)))
  arrivals[0] = 0
  return prompts, arrivals.tolist()


def _serve(model, policy, shared, prompts, arrivals, new=10):
  engine = jaxinfer.Engine(model, max_batch_size=4, page_size=PS, max_step_tokens=16, min_token_bucket=16,
                           max_model_len=128, max_prefix_groups=1, async_scheduling=False,
                           enable_prefix_caching=True, enable_shared_prefix_attention=shared,
                           kv_policy=KVPolicyConfig(**policy))
  log = []  # per step: {grouped request: query position + 1}, {decoding request: query position + 1}
  group = engine.scheduler._group

  def recording_group(seqs):
    ordered, groups = group(seqs)
    grouped = {ordered[i].request.request_id: ordered[i].start + 1
               for g in groups for i in range(g.first, g.first + g.num_seqs)}
    log.append((grouped, {s.request.request_id: s.start + 1 for s in seqs if s.num_tokens == 1}))
    return ordered, groups

  engine.scheduler._group = recording_group
  out, ids, step = {}, {}, 0
  while len(ids) < len(prompts) or engine.has_unfinished():
    for i, (p, t) in enumerate(zip(prompts, arrivals)):
      if t == step and i not in ids:
        ids[i] = engine.add_request(p, max_new_tokens=new)
    for o in engine.step():
      out.setdefault(o.request_id, []).extend(o.new_token_ids)
    step += 1
  engine.check_pages()
  return [out[ids[i]] for i in range(len(prompts))], log, {rid: i for i, rid in ids.items()}, engine


@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_with_shared_prefix_attention_matches_policy_alone(model, name):
  policy = POLICIES[name]
  prompts, arrivals = _workload(model.config.vocab_size)
  want, _, _, alone = _serve(model, policy, False, prompts, arrivals)
  got, log, index, engine = _serve(model, policy, True, prompts, arrivals)
  assert got == want
  assert engine.stats["partial_prefills"] > 0 and engine.prefix_stats["hit_tokens"] > 0 or name in NEVER_GROUPED
  grouped_steps = [g for g, _ in log if g]
  if name in NEVER_GROUPED:  # H2O: scoring rows need their mass over the prefix; duo: no plain view
    assert not grouped_steps and engine.stats["shared_prefix_groups"] == 0
    if name == "h2o":
      assert engine.kv_policy.stats["compactions"] > 0  # the policy did evict meanwhile
    return
  assert grouped_steps and engine.stats["shared_prefix_groups"] == len(grouped_steps)
  if name == "streaming":
    limit = policy["sink_tokens"] + policy["window"]
    # grouped only while no key is masked (query position < sinks + window) ...
    assert all(end <= limit for g in grouped_steps for end in g.values())
    # ... and a grouped sequence that decodes past it leaves its group (it decodes through the masked pass)
    left = {rid for g, d in log for rid, end in d.items() if end > limit and rid not in g}
    was = {rid for g in grouped_steps for rid in g}
    assert was & left
    assert all(end <= limit or rid not in g for g, d in log for rid, end in d.items())
    # and in some grouped step a masked sequence ran beside the group (the policy's own path, same step)
    assert any(g and any(end > limit for end in d.values()) for g, d in log)
  else:  # snapkv: the prompts over the budget were compacted and never grouped; some within it were grouped
    over = {rid for rid, i in index.items() if len(prompts[i]) > policy["budget"]}
    was = {rid for g in grouped_steps for rid in g}
    assert over and not (over & was) and was
    assert engine.kv_policy.stats["compactions"] == len(over) == alone.kv_policy.stats["compactions"]
