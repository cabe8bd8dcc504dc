"""A prefix-cache hit that ends on a cached page copies that page before the request writes into it
(copy-on-write, KVPool.copy_pages): under a KV policy the copy must carry the policy's per-head slot positions
too, or the copied tokens are masked out. Greedy tokens with prefix caching on equal those with it off."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import jaxinfer
from jaxinfer.engine.kv_policies import KVPolicyConfig
from testlib import tiny_model_config

PS = 8


@pytest.fixture(scope="module")
def model():
  return jaxinfer.Transformer(tiny_model_config(dtype="float32"), rngs=nnx.Rngs(5))


def _generate(model, policy, caching, prompts):
  engine = jaxinfer.Engine(model, max_batch_size=2, page_size=PS, max_step_tokens=16, min_token_bucket=16,
                           max_model_len=128, async_scheduling=False, kv_policy=policy,
                           enable_prefix_caching=caching)
  outs = []
  for prompt in prompts:  # one after another: the second finds the first's pages in the cache
    rid = engine.add_request(prompt, max_new_tokens=10)
    toks = []
    while engine.has_unfinished():
      for o in engine.step():
        if o.request_id == rid:
          toks += o.new_token_ids
    outs.append(toks)
  return outs, engine


@pytest.mark.parametrize("policy", [dict(name="streaming", sink_tokens=4, window=40),
                                    dict(name="streaming", sink_tokens=4, window=40, positions="cache"),
                                    dict(name="duo_masked", sink_tokens=4, window=40, head_classes=("rs", "sr"))])
def test_copy_on_write_keeps_policy_positions(model, policy):
  rng = np.random.default_rng(11)
  prompt = rng.integers(1, model.config.vocab_size, 4 * PS).tolist()  # whole pages: the hit ends on one
  prompts = [prompt, prompt]
  cfg = KVPolicyConfig(**policy)
  cached, engine = _generate(model, cfg, True, prompts)
  plain, _ = _generate(model, cfg, False, prompts)
  assert engine.prefix_stats["hit_tokens"] > 0 and engine.prefix_stats["copies"] > 0  # the case under test ran
  assert cached == plain
