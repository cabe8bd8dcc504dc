"""The realised DuoAttention layout (policy "duo": retrieval heads paged, streaming heads in a sinks + window
store) against the masked one-pool layout ("duo_masked") and the dense reference that masks exactly what duo
keeps; the pool it sizes from a byte budget; its refusals."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import jaxinfer
from jaxinfer.config.schema import ConfigError
from jaxinfer.engine.kv_policies import KVPolicyConfig
from jaxinfer.engine.kv_policies import duo
from jaxinfer.engine.kv_policies import reference as R
from jaxinfer.generation.sampling import SamplingParams
from testlib import tiny_model_config

PS, STEP, SINKS, WINDOW = 4, 16, 2, 6  # chunks of 16 > window 6
CLASSES = ("ss", "sr", "rr")  # a layer all streaming, one mixed (streaming head first), one all retrieval


@pytest.fixture(scope="module")
def model():
  cfg = tiny_model_config(dtype="float32", num_layers=3, max_position_embeddings=512)
  return jaxinfer.Transformer(cfg, rngs=nnx.Rngs(5))


def _engine(model, name, positions="original", **kw):
  policy = KVPolicyConfig(name=name, sink_tokens=SINKS, window=WINDOW, head_classes=CLASSES, positions=positions)
  kw = dict(max_batch_size=2, page_size=PS, max_step_tokens=STEP, min_token_bucket=STEP, max_model_len=128,
            async_scheduling=False, kv_policy=policy) | kw
  return jaxinfer.Engine(model, **kw)


def _serve(engine, prompts, new, preempt_at=None):
  """Greedy outputs of every prompt; request 0 is preempted once after step preempt_at."""
  ids = [engine.add_request(p, max_new_tokens=new) for p in prompts]
  out = {i: [] for i in ids}
  steps = 0
  while engine.has_unfinished():
    for o in engine.step():
      out[o.request_id] += o.new_token_ids
    steps += 1
    if steps == preempt_at and ids[0] in engine._requests:
      engine.preempt(ids[0])
  return [out[i] for i in ids]


@pytest.mark.parametrize("positions,async_scheduling", [("original", False), ("cache", True)])
def test_duo_matches_masked_and_dense_reference(model, positions, async_scheduling):
  cfg = model.config
  rng = np.random.default_rng(7)
  prompts = [rng.integers(1, cfg.vocab_size, n).tolist() for n in (29, 21, 16)]  # > sinks + window, 3 requests
  prompts[2] = prompts[0][:24] + prompts[2]  # a shared prefix: prefix caching must not name duo's pages
  new = 9
  realised = _engine(model, "duo", positions, async_scheduling=async_scheduling, enable_prefix_caching=True)
  got = _serve(realised, prompts, new, preempt_at=4)
  assert realised.stats["preemptions"] == 1 and realised.stats["partial_prefills"] > 0
  if positions == "original":  # the masked one-pool layout gives the same tokens (once: it costs an engine)
    assert got == _serve(_engine(model, "duo_masked", positions), prompts, new)
  heads = [[c == "s" for c in row] for row in CLASSES]
  for prompt, out in zip(prompts, got):
    tokens = prompt + out
    n = len(tokens)
    vis = R.streaming_visibility(n, cfg.num_layers, cfg.num_kv_heads, SINKS, WINDOW, heads)
    shift = R.cache_sink_shift(n, SINKS, WINDOW) if positions == "cache" else None
    logits = R.masked_logits(model, tokens, vis, sinks=SINKS, sink_shift=shift)
    assert out == logits[len(prompt) - 1:n - 1].argmax(-1).tolist()
  # the layout is the realised one: pages hold the retrieval heads only, the store sinks + window slots
  pool = realised.runner.pool
  assert [k.shape[2] for k in pool.k] == [0, 1, 2]
  assert [k.shape[1:3] for k in pool.policy.store_k] == [(SINKS + WINDOW, 2), (SINKS + WINDOW, 1),
                                                          (SINKS + WINDOW, 0)]
  realised.check_pages()


def test_duo_fits_more_pages_in_the_same_bytes(model):
  cfg = model.config
  budget = 600_000
  plain = _engine(model, "none", kv_cache_bytes=budget, max_model_len=None)
  realised = _engine(model, "duo", kv_cache_bytes=budget, max_model_len=None)
  masked = _engine(model, "duo_masked", kv_cache_bytes=budget, max_model_len=None)
  d, item = cfg.resolved_head_dim, 4
  retrieval = sum(row.count("r") for row in CLASSES)  # 3 of 6 (layer, kv head) pairs
  full_page = 2 * PS * d * item * cfg.num_kv_heads * cfg.num_layers
  duo_page = 2 * PS * d * item * retrieval
  streaming = sum(row.count("s") for row in CLASSES)
  store = 2 * 2 * (SINKS + WINDOW) * d * item * streaming + cfg.num_layers * 2 * (SINKS + WINDOW) * 4
  assert plain.num_pages == budget // full_page and masked.num_pages == plain.num_pages
  assert realised.num_pages == (budget - store) // duo_page
  assert realised.num_pages > 1.9 * plain.num_pages  # ~ (R + S) / R = 2 here, less the store
  pool = realised.runner.pool
  assert pool.nbytes == realised.num_pages * duo_page and pool.policy.nbytes == store
  per_slot, full_per_slot = pool.nbytes / pool.num_slots, plain.runner.pool.nbytes / plain.runner.pool.num_slots
  assert per_slot == full_per_slot * retrieval / (cfg.num_kv_heads * cfg.num_layers)  # KV bytes per token: R / (R + S)


def test_duo_on_a_quantized_pool_matches_the_quantized_reference(model):
  """int8 with per-token keys: pages and store hold codes + a scale per token and head, so every k/v the model
  reads is kv_quant.roundtrip of the float one, exactly what the dense reference's quant_dtype does."""
  cfg = model.config
  prompt = np.random.default_rng(11).integers(1, cfg.vocab_size, 35).tolist()
  engine = _engine(model, "duo", kv_cache_dtype="int8", kv_quant_key_granularity="per_token")
  rid = engine.add_request(prompt, SamplingParams(logprobs=True), max_new_tokens=8)
  out, logp = [], []
  while engine.has_unfinished():
    for o in engine.step():
      out, logp = out + o.new_token_ids, logp + o.logprobs
  pool = engine.runner.pool
  assert rid == 0 and pool.quantized and pool.policy.store_k[0].dtype == np.int8
  assert pool.nbytes == engine.num_pages * duo.page_bytes(engine.kv_policy.config, cfg, engine.engine_config)
  assert pool.policy.nbytes == duo.store_bytes(engine.kv_policy.config, cfg, engine.engine_config)
  tokens = prompt + out
  n = len(tokens)
  vis = R.streaming_visibility(n, cfg.num_layers, cfg.num_kv_heads, SINKS, WINDOW,
                               [[c == "s" for c in row] for row in CLASSES])
  logits = R.masked_logits(model, tokens, vis, quant_dtype="int8")
  top = logits.max(-1, keepdims=True)
  lp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  rows = np.arange(len(prompt) - 1, n - 1)
  assert out == logits[rows].argmax(-1).tolist()
  np.testing.assert_allclose(logp, lp[rows, tokens[len(prompt):]], atol=1e-4)
  float_logits = R.masked_logits(model, tokens, vis)  # the quantization is really applied
  assert np.abs(float_logits - logits)[rows].max() > 1e-3


def test_duo_refusals_name_the_field(model):
  with pytest.raises(ConfigError, match=r"^engine\.kv_policy\.head_classes: duo_masked"):
    jaxinfer.Engine(model, kv_policy=KVPolicyConfig(name="duo_masked"), max_model_len=64)
  all_streaming = KVPolicyConfig(name="duo", sink_tokens=SINKS, window=WINDOW, head_classes=("ss",) * 3)
  with pytest.raises(ConfigError, match=r"^engine\.kv_cache_bytes: "):
    jaxinfer.Engine(model, kv_policy=all_streaming, kv_cache_bytes=10**6)
  with pytest.raises(ConfigError, match=r"^engine\.kv_cache_bytes: .*store"):
    _engine(model, "duo", kv_cache_bytes=1000, max_model_len=None)
