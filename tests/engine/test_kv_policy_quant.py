"""KV policies on a quantized KV cache (engine.kv_cache_dtype int8 / float8_e4m3fn).

1. Per-token keys and values: a slot's dequantized k/v depend on its own token only, so the dense reference
   (kv_policies/reference.py) fed the SAME dequantized k/v (quant_dtype: dequantize(quantize(x)) per token)
   and masked with the slots the policy kept must reproduce the engine: greedy tokens identical and the
   engine's log p(token) equal to the reference's within LOGPROB_ATOL = 1e-4 (float32 model: what remains is
   summation order, and a code may flip by one step where a k/v element sits on a rounding boundary).
2. Per-channel keys (the default; compaction requantizes them, kv_quant.move_slots): the engine with policy
   and quantized cache against the dense float reference with the same kept mask: |log p error| within the
   bounds of tests/engine/test_kv_quantization.py (int8 0.02, fp8 0.08 times max(1, max |logit|)), greedy
   agreement reported and >= 0.9; and the prompt's kept set (SnapKV / H2O select at the end of prefill) the
   same as the float engine's except at near-ties: a slot kept by one and not the other has a float score
   within TIE_RTOL of the float selection's threshold.
"""

from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxinfer
from jaxinfer.engine.kv_policies import KVPolicyConfig
from jaxinfer.engine.kv_policies.attention import MaskRule, PolicyState, PolicyStep
from jaxinfer.engine.kv_policies import reference as R
from jaxinfer.engine.kv_policies.device import kept_positions
from jaxinfer.generation.sampling import SamplingParams
from testlib import tiny_model_config

PS, STEP, PROMPT, NEW = 8, 16, 37, 14
LOGPROB_ATOL = 1e-4
LOGIT_TOL = {"int8": 0.02, "float8_e4m3fn": 0.08}
TIE_RTOL = 0.05
CASES = {
    "streaming": dict(name="streaming", sink_tokens=4, window=12),
    "snapkv": dict(name="snapkv", window=8, budget=24),
    "h2o": dict(name="h2o", window=6, budget=20),
}


@pytest.fixture(scope="module")
def model():
  return jaxinfer.Transformer(tiny_model_config(dtype="float32", initializer_range=0.05), rngs=nnx.Rngs(5))


def _run(model, policy, dtype, granularity, prompt):
  """Greedy tokens, their engine log p, and after every step the positions each (layer, kv head) holds."""
  engine = jaxinfer.Engine(model, max_batch_size=2, page_size=PS, max_step_tokens=STEP, min_token_bucket=STEP,
                           max_model_len=128, async_scheduling=False, kv_policy=policy, kv_cache_dtype=dtype,
                           kv_quant_key_granularity=granularity)
  rid = engine.add_request(prompt, SamplingParams(logprobs=True), max_new_tokens=NEW)
  out, logp, kept = [], [], []
  while engine.has_unfinished():
    for o in engine.step():
      out += o.new_token_ids
      logp += o.logprobs
    request = engine._requests.get(rid)
    if request is not None:
      kept.append((request.num_computed, kept_positions(engine.runner.pool, request.pages,
                                                        engine.kv_policy.held[rid])))
  engine.check_pages()
  assert engine.runner.pool.quantized == (dtype is not None)
  return out, np.asarray(logp), kept, engine


def _visibility(model, policy, n, prompt_len, kept):
  cfg = model.config
  layers, hkv = cfg.num_layers, cfg.num_kv_heads
  if policy.name == "streaming":
    return R.streaming_visibility(n, layers, hkv, policy.sink_tokens, policy.window)
  vis = np.broadcast_to(np.tril(np.ones((n, n), bool))[:, None, :], (layers, n, hkv, n)).copy()
  for computed, pos in kept:  # decode query `computed` sees what was held after the step before it, and itself
    if prompt_len <= computed < n:
      vis[:, computed] = False
      for layer in range(layers):
        for h in range(hkv):
          vis[layer, computed, h, pos[layer, h][pos[layer, h] >= 0]] = True
      vis[:, computed, :, computed] = True
  return vis


def _reference_logp(logits, tokens, prompt_len):
  rows = logits[prompt_len - 1:len(tokens) - 1]
  lse = np.log(np.exp(rows - rows.max(-1, keepdims=True)).sum(-1)) + rows.max(-1)
  return rows[np.arange(rows.shape[0]), tokens[prompt_len:]] - lse, rows


@pytest.mark.parametrize("case,dtype", [("streaming", "int8"), ("snapkv", "float8_e4m3fn"), ("h2o", "int8")])
def test_policy_on_per_token_quantized_cache_matches_reference(model, case, dtype):
  policy = KVPolicyConfig(**CASES[case])
  prompt = np.random.default_rng(len(case) + len(dtype)).integers(1, model.config.vocab_size, PROMPT).tolist()
  out, logp, kept, _ = _run(model, policy, dtype, "per_token", prompt)
  tokens = np.asarray(prompt + out)
  vis = _visibility(model, policy, len(tokens), PROMPT, kept)
  want_logp, rows = _reference_logp(R.masked_logits(model, tokens, vis, sinks=policy.sink_tokens,
                                                    quant_dtype=dtype), tokens, PROMPT)
  assert out == rows.argmax(-1).tolist()
  np.testing.assert_allclose(logp, want_logp, atol=LOGPROB_ATOL, rtol=0)
  # the quantization is really there: the float reference with the same mask differs by more than that
  float_logp, _ = _reference_logp(R.masked_logits(model, tokens, vis, sinks=policy.sink_tokens), tokens, PROMPT)
  assert np.abs(float_logp - want_logp).max() > 10 * LOGPROB_ATOL


def _prompt_scores(model, policy, prompt):
  """Float scores the policy ranks the prompt's slots by at the end of prefill, [layers, kv_heads, prompt]."""
  from jaxinfer.engine.kv_policies.device import max_pool

  cfg = model.config
  probs = R.attention_probs(model, prompt)  # [layers, heads, N, N]
  rows = slice(PROMPT - policy.window, PROMPT) if policy.name == "snapkv" else slice(0, PROMPT)
  g = cfg.num_heads // cfg.num_kv_heads
  mass = probs[:, :, rows].sum(2).reshape(cfg.num_layers, cfg.num_kv_heads, g, PROMPT).sum(2)
  if policy.name == "snapkv":
    valid = (np.arange(PROMPT) < PROMPT - policy.window)[:, None]
    mass = np.stack([np.asarray(max_pool(m.T, valid, policy.pool_kernel)).T for m in mass])
  return mass


@pytest.mark.parametrize("case,dtype", [("snapkv", "int8"), ("h2o", "float8_e4m3fn")])
def test_policy_on_per_channel_quantized_cache(model, case, dtype):
  policy = KVPolicyConfig(**CASES[case])
  prompt = np.random.default_rng(11).integers(1, model.config.vocab_size, PROMPT).tolist()
  out, logp, kept, engine = _run(model, policy, dtype, "per_channel", prompt)
  assert engine.kv_policy.stats["compactions"] >= 1  # the requantizing move ran
  tokens = np.asarray(prompt + out)
  vis = _visibility(model, policy, len(tokens), PROMPT, kept)
  want_logp, rows = _reference_logp(R.masked_logits(model, tokens, vis), tokens, PROMPT)
  bound = LOGIT_TOL[dtype] * max(1.0, float(np.abs(rows).max()))
  assert np.abs(logp - want_logp).max() <= bound
  agree = float(np.mean(rows.argmax(-1) == np.asarray(out)))
  print(f"{case} {dtype} per-channel: greedy agreement with the float reference {agree:.2f}, "
        f"max |log p error| {np.abs(logp - want_logp).max():.4f} (bound {bound:.4f})")
  assert agree >= 0.9
  # the prompt's kept set against the float engine's: equal except at near-ties of the float scores
  _, _, kept_f, _ = _run(model, policy, None, "per_channel", prompt)
  first = lambda rec: next(pos for computed, pos in rec if computed >= PROMPT)  # noqa: E731  after prefill
  q_pos, f_pos = first(kept), first(kept_f)
  scores = _prompt_scores(model, policy, prompt)
  prefix = PROMPT - policy.window
  for layer in range(model.config.num_layers):
    for h in range(model.config.num_kv_heads):
      a = {int(p) for p in q_pos[layer, h] if 0 <= p < prefix}
      b = {int(p) for p in f_pos[layer, h] if 0 <= p < prefix}
      assert len(a) == len(b) == policy.budget - policy.window
      s = scores[layer, h, :prefix]
      threshold = np.sort(s)[::-1][policy.budget - policy.window - 1]
      for p in a ^ b:
        assert abs(s[p] - threshold) <= TIE_RTOL * threshold, (layer, h, p, s[p], threshold)


def _int8_converts(jaxpr, out):
  """Shapes of every int8 -> other dtype conversion in a jaxpr, nested jaxprs (loop bodies, pjit) included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "convert_element_type" and eqn.invars[0].aval.dtype == jnp.int8:
      out.append(eqn.invars[0].aval.shape)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      _int8_converts(sub, out)
  return out


@pytest.mark.parametrize("granularity", ["per_channel", "per_token"])
def test_masked_path_never_dequantizes_the_pool(model, granularity):
  """One layer's write + masked policy attention on a 4096-page int8 pool: no int8 -> float conversion of an
  array as large as a tenth of the pool anywhere in the jaxpr; the conversions found are the gathered pages."""
  from jaxinfer.engine.kv_pool import KVPool
  from jaxinfer.engine.paged_cache import PagedKVCache

  cfg = model.config
  P, ps, t, hkv = 4096, 4, 8, cfg.num_kv_heads
  pool = KVPool.create(cfg, P, ps, "int8", key_granularity=granularity)
  state = PolicyState.create(cfg.num_layers, P * ps, hkv, 4, 8 * ps)
  step = PolicyStep(state=state, seq_slots=jnp.arange(4, dtype=jnp.int32), weights=jnp.ones((t,), jnp.float32),
                    reset=jnp.zeros((4,), bool))
  cache = PagedKVCache(k_pages=pool.k, v_pages=pool.v, page_table=jnp.arange(32, dtype=jnp.int32).reshape(4, 8),
                       kv_lens=jnp.full((4,), 9, jnp.int32), cu_q_lens=jnp.arange(5, dtype=jnp.int32) * 2,
                       num_seqs=jnp.int32(4), slots=jnp.arange(t, dtype=jnp.int32), attention_impl="xla",
                       k_scales=pool.k_scales, v_scales=pool.v_scales, policy=step,
                       policy_rule=MaskRule(sinks=2, window=4, scores=True))
  q = jnp.ones((1, t, cfg.num_heads, cfg.resolved_head_dim), jnp.float32)
  kv = jnp.ones((1, t, hkv, cfg.resolved_head_dim), jnp.float32)
  fn = lambda c, q, k, v: c.attend(0, q, k, v, positions=jnp.arange(t, dtype=jnp.int32)[None],  # noqa: E731
                                   segment_ids=None, sliding_window=None, implementation=None)
  jaxpr = jax.make_jaxpr(fn)(cache, q, kv, kv)
  from_int8 = _int8_converts(jaxpr.jaxpr, [])
  assert from_int8, "no int8 conversion found: the check would be vacuous"
  assert max(int(np.prod(s)) for s in from_int8) < int(np.prod(pool.k[0].shape)) // 10, from_int8


@pytest.mark.parametrize("dtype", [None, "int8"])
def test_h2o_dense_reference_matches_engine(model, dtype):
  """kv_policies/h2o_reference.py (the experiment's H2O perplexity) against the engine's H2O: teacher-forced on
  the engine's own greedy tokens, the same argmax and log p within LOGPROB_ATOL (per-token KV for int8)."""
  from jaxinfer.engine.kv_policies.h2o_reference import h2o_logits

  policy = KVPolicyConfig(**CASES["h2o"])
  prompt = np.random.default_rng(21).integers(1, model.config.vocab_size, PROMPT).tolist()
  out, logp, _, engine = _run(model, policy, dtype, "per_token", prompt)
  assert engine.kv_policy.stats["compactions"] >= 1
  tokens = np.asarray(prompt + out)
  logits = h2o_logits(model, tokens, prompt_len=PROMPT, budget=policy.budget, window=policy.window,
                      quant_dtype=dtype)
  want_logp, rows = _reference_logp(logits, tokens, PROMPT)
  assert out == rows.argmax(-1).tolist()
  np.testing.assert_allclose(logp, want_logp, atol=LOGPROB_ATOL, rtol=0)
