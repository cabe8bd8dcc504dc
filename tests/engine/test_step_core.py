"""The engine core's new seams: the lm_head only on sampled rows (read from the step's jaxpr), multi-row
verification steps, rollback, async scheduling against synchronous steps, the typed StepBatch and
EngineConfig as a validated config section."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from testlib import tiny_model_config

import jaxinfer
from jaxinfer.config import ConfigError, engine_section, from_section
from jaxinfer.engine import Engine, EngineConfig, KVPool, NgramProposer, Proposer, StepBatch
from jaxinfer.engine import step as step_lib

CFG = tiny_model_config()
SMALL = dict(max_batch_size=4, page_size=4, num_pages=40, max_step_tokens=32, min_seq_bucket=4, max_model_len=96)
SPEC = dict(SMALL, min_token_bucket=32, max_rows_per_seq=4)  # one token bucket: few verification programs


def _dots(jaxpr):
  """Output shapes of every dot_general in a jaxpr, nested jaxprs included."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      shapes.append(tuple(eqn.outvars[0].aval.shape))
    for sub in jax.core.jaxprs_in_params(eqn.params):
      shapes += _dots(sub)
  return shapes


def test_lm_head_runs_on_the_sampled_rows_only():
  cfg = tiny_model_config(vocab_size=200, intermediate_size=96)  # sizes no other matmul has
  graphdef, state = nnx.split(jaxinfer.init_model(cfg))
  t_pad, s_pad, r_pad, pps = 32, 4, 4, 8  # 32 token rows (a prefill chunk + decodes), 4 sampled rows
  pool = KVPool.create(cfg, 16, 4)
  batch = StepBatch.empty(t_pad, s_pad, r_pad, 0, pps, pool.num_slots)
  step = lambda *a: step_lib.engine_step(graphdef, *a, max_rows=8)  # noqa: E731
  jaxpr = jax.make_jaxpr(step)(state, pool, np.zeros((4, pps), np.int32), np.zeros((8,), np.int32), batch)
  dots = _dots(jaxpr.jaxpr)
  vocab_dots = [s for s in dots if s[-1] == cfg.vocab_size]
  assert vocab_dots == [(r_pad, cfg.vocab_size)], vocab_dots  # one lm_head matmul, on R rows, not T
  mlp_dots = [s for s in dots if s[-1] == cfg.intermediate_size]
  assert len(mlp_dots) == 2 * cfg.num_layers and all(s[-2] == t_pad for s in mlp_dots)  # layers: all T rows


def test_hidden_states_seam_gives_the_logits(model):
  tokens = np.asarray([np.random.default_rng(0).integers(0, CFG.vocab_size, size=9)])
  hidden = model(tokens, return_hidden=True)
  assert hidden.shape == (1, 9, CFG.hidden_size)
  np.testing.assert_allclose(model.logits(hidden[:, [2, 8]]), model(tokens)[:, [2, 8]], atol=1e-5)


class Oracle(Proposer):
  """Right drafts for the first requests, junk for others: both must give the same tokens as no drafts."""

  def __init__(self, answers, rng):
    self.answers, self.rng = answers, rng

  def propose(self, request, max_tokens):
    want = self.answers.get(tuple(request.prompt))
    if want is None or self.rng.random() < 0.3:
      return self.rng.integers(0, CFG.vocab_size, size=max_tokens).tolist()
    done = len(request.output)
    return want[done:done + max_tokens]


def test_verification_rows_give_generate_tokens_and_accept_right_drafts(model):
  rng = np.random.default_rng(3)
  prompts = [rng.integers(0, CFG.vocab_size, size=int(n)).tolist() for n in (5, 17, 9, 30, 3)]
  expected = [jaxinfer.generate(model, [p], 12)[0] for p in prompts]
  answers = {tuple(p): e for p, e in zip(prompts[:3], expected[:3])}
  engine = Engine(model, proposer=Oracle(answers, rng), **SPEC)
  assert engine.run(prompts, max_new_tokens=12, progress=False) == expected
  assert engine.stats["spec_accepted_tokens"] > 10, engine.stats
  assert engine.stats["spec_draft_tokens"] > engine.stats["spec_accepted_tokens"]  # junk drafts were rejected
  assert engine.stats["steps"] < 12 + 5  # several tokens per step for the oracle's requests
  assert engine.check_pages()["in_use"] == 0


def test_ngram_proposer_on_a_repetitive_prompt_is_lossless_when_sampling(model):
  rng = np.random.default_rng(4)
  unit = rng.integers(0, CFG.vocab_size, size=6).tolist()
  prompts = [unit * 4, rng.integers(0, CFG.vocab_size, size=11).tolist()]
  sampling = jaxinfer.SamplingParams(temperature=0.8, seed=5)
  expected = jaxinfer.generate(model, prompts, 10, sampling=sampling)
  engine = Engine(model, proposer=NgramProposer(2), **SPEC)
  assert engine.run(prompts, sampling, max_new_tokens=10, progress=False) == expected


def test_rollback_returns_pages_and_regenerates_the_same_tokens(model):
  rng = np.random.default_rng(5)
  prompt = rng.integers(0, CFG.vocab_size, size=10).tolist()
  expected = jaxinfer.generate(model, [prompt], 20)[0]
  engine = Engine(model, enable_prefix_caching=True, **SMALL)
  rid = engine.add_request(prompt, max_new_tokens=20)
  got = []
  while len(got) < 14:
    for out in engine.step():
      got += out.new_token_ids
  held = len(engine.scheduler.running[0].pages)
  assert engine.rollback(rid, 9) >= 2  # 24 tokens -> 15: two pages of 4 go back
  assert len(engine.scheduler.running[0].pages) < held
  got = got[:-9]
  for out in engine.stream():
    got += out.new_token_ids
  assert got == expected and engine.finish_reason(rid) == "length"
  assert engine.check_pages()["in_use"] == 0
  with pytest.raises(jaxinfer.engine.UnknownRequestError):
    engine.rollback(rid, 1)


def test_async_and_sync_steps_give_the_same_tokens_and_async_hides_nothing(model):
  rng = np.random.default_rng(6)
  prompts = [rng.integers(0, CFG.vocab_size, size=int(n)).tolist() for n in rng.integers(2, 40, size=7)]
  stops = [prompts[0][0]]
  sampling = jaxinfer.SamplingParams(temperature=0.9, top_k=20, seed=1, logprobs=True)
  results = {}
  for mode in (False, True):
    engine = Engine(model, async_scheduling=mode, **SMALL)
    outs = {}
    for p in prompts:
      engine.add_request(p, sampling=sampling, max_new_tokens=9, stop_token_ids=stops)
    for out in engine.stream():
      tokens, lps = outs.setdefault(out.request_id, ([], []))
      tokens += out.new_token_ids
      lps += out.logprobs
    results[mode] = outs
    assert engine.check_pages()["in_use"] == 0
  assert results[True].keys() == results[False].keys()
  for rid in results[False]:
    assert results[True][rid][0] == results[False][rid][0]
    np.testing.assert_allclose(results[True][rid][1], results[False][rid][1], atol=1e-5)


def test_decode_only_steps_are_padded_to_the_sequence_bucket(model):
  engine = Engine(model, **SMALL)
  engine.run([[1, 2, 3]], max_new_tokens=5, progress=False)
  # one prefill step padded to the 16-token bucket, then 4 decode steps of 4 rows (the sequence bucket)
  assert engine.stats["padded_tokens"] == 16 + 4 * 4, engine.stats
  explicit = Engine(model, **{**SMALL, "min_token_bucket": 16})
  explicit.run([[1, 2, 3]], max_new_tokens=5, progress=False)
  assert explicit.stats["padded_tokens"] == 5 * 16


def test_engine_config_is_a_validated_section():
  section = engine_section(page_size=32)
  assert section.page_size == 32 and "async_scheduling" in section
  cfg = from_section(EngineConfig, section, "engine")
  assert cfg == EngineConfig(page_size=32)
  with pytest.raises(ConfigError, match=r"^engine.page_size: page_size must be a positive integer, got 0"):
    EngineConfig(page_size=0)
  with pytest.raises(ConfigError, match=r"^engine.max_step_tokens: max_step_tokens=8 must be >= max_batch_size=16"):
    EngineConfig(max_batch_size=16, max_step_tokens=8)
  with pytest.raises(ConfigError, match=r"^engine.kv_dtype: 'float33' is not a dtype"):
    EngineConfig(kv_dtype="float33")
  with pytest.raises(ConfigError, match=r"^engine.not_a_field: unknown field"):
    EngineConfig.from_kwargs(None, not_a_field=1)
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.page_size = 8


def test_engine_takes_a_config_and_keyword_overrides(model):
  cfg = EngineConfig(**SMALL)
  engine = Engine(model, cfg, page_size=8)
  assert engine.page_size == 8 and engine.max_batch_size == 4 and engine.engine_config.num_pages == 40
  assert engine.runner.pool.k[0].dtype == np.float32
  half = Engine(model, cfg, kv_dtype="bfloat16")
  assert str(half.runner.pool.k[0].dtype) == "bfloat16" and half.runner.pool.k_scales is None
