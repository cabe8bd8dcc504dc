"""Per-request sampling: seeded streams independent of batch composition, stop tokens, max tokens, logprobs."""

import jax
import numpy as np
import pytest

import jaxinfer
from jaxinfer import SamplingParams
from jaxinfer.engine import Engine

from testlib import tiny_model_config

CFG = tiny_model_config()

ENGINE = dict(max_batch_size=8, page_size=4, num_pages=64, max_step_tokens=16, min_token_bucket=8)


def _drain(engine):
  got = {}
  for out in engine.stream():
    got.setdefault(out.request_id, []).extend(out.new_token_ids)
  return got


def test_seeded_sampling_does_not_depend_on_batch_composition(model):
  rng = np.random.default_rng(5)
  prompt = rng.integers(0, CFG.vocab_size, size=11).tolist()
  sampling = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, min_p=0.02, seed=1234)

  alone = Engine(model, **ENGINE)
  rid = alone.add_request(prompt, sampling=sampling, max_new_tokens=12)
  reference = _drain(alone)[rid]

  # the same request among others (different lengths, greedy and sampled), arriving before and after it,
  # in a pool small enough that it is preempted and recomputed on the way
  busy = Engine(model, **{**ENGINE, "num_pages": 14})
  for L in (30, 5):
    busy.add_request(rng.integers(0, CFG.vocab_size, size=L).tolist(), max_new_tokens=20,
                     sampling=SamplingParams(temperature=1.0, seed=L))
  busy.step()
  rid = busy.add_request(prompt, sampling=sampling, max_new_tokens=12)
  busy.add_request(rng.integers(0, CFG.vocab_size, size=23).tolist(), max_new_tokens=15)
  got = _drain(busy)
  assert busy.stats["preemptions"] > 0
  assert got[rid] == reference
  # a different seed gives a different stream
  other = Engine(model, **ENGINE)
  rid = other.add_request(prompt, sampling=SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=99),
                          max_new_tokens=12)
  assert _drain(other)[rid] != reference


def test_run_matches_generate_when_sampling(model):
  rng = np.random.default_rng(6)
  prompts = [rng.integers(0, CFG.vocab_size, size=L).tolist() for L in (4, 19, 9)]
  sampling = SamplingParams(temperature=0.8, top_p=0.9, seed=3)
  # one SamplingParams for all prompts: prompt i gets seed 3 + i in both
  expected = jaxinfer.generate(model, prompts, 8, sampling=sampling)
  assert Engine(model, **ENGINE).run(prompts, sampling, max_new_tokens=8, progress=False) == expected


def test_stop_tokens_and_max_tokens(model):
  rng = np.random.default_rng(7)
  prompt = rng.integers(0, CFG.vocab_size, size=6).tolist()
  engine = Engine(model, **ENGINE)
  greedy = engine.run([prompt], max_new_tokens=10, progress=False)[0]
  stop = greedy[3]
  first = greedy.index(stop)  # the first occurrence ends it (stop token included)
  rid = engine.add_request(prompt, max_new_tokens=10, stop_token_ids=[stop, 127 if stop != 127 else 126])
  outs = list(engine.stream())
  assert [o.new_token_ids[0] for o in outs] == greedy[:first + 1]
  assert [o.finished for o in outs] == [False] * first + [True]
  assert outs[-1].finish_reason == "stop" and engine.finish_reason(rid) == "stop"
  rid = engine.add_request(prompt, max_new_tokens=4)
  outs = list(engine.stream())
  assert outs[-1].finish_reason == "length" and len(outs) == 4


def test_logprobs_are_those_of_the_full_forward(model):
  rng = np.random.default_rng(8)
  prompt = rng.integers(0, CFG.vocab_size, size=9).tolist()
  engine = Engine(model, **ENGINE)
  rid = engine.add_request(prompt, sampling=SamplingParams(temperature=1.0, seed=5, logprobs=True),
                           max_new_tokens=6)
  outs = list(engine.stream())
  tokens = [o.new_token_ids[0] for o in outs]
  logprobs = [o.logprobs[0] for o in outs]
  seq = np.asarray([prompt + tokens])
  logits = model(seq)
  full = jax.nn.log_softmax(logits[0], axis=-1)
  want = [float(full[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)]
  np.testing.assert_allclose(logprobs, want, atol=1e-4)
  assert all(o.request_id == rid for o in outs)
  # without logprobs=True nothing is returned
  engine.add_request(prompt, max_new_tokens=2)
  assert all(o.logprobs is None for o in engine.stream())


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.7, top_k=1, seed=2),
                                      SamplingParams(temperature=0.7, min_p=1.0, seed=2)])
def test_degenerate_filters_are_greedy(model, sampling):
  rng = np.random.default_rng(9)
  prompts = [rng.integers(0, CFG.vocab_size, size=L).tolist() for L in (5, 13)]
  engine = Engine(model, **ENGINE)
  assert engine.run(prompts, sampling, max_new_tokens=6, progress=False) == \
      engine.run(prompts, max_new_tokens=6, progress=False)
