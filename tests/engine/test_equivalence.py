"""The engine's greedy outputs are exactly jaxinfer.generate's, one request at a time, with continuous
batching, chunked prefill and preemption all at work; and its compiled programs stay bounded."""

import numpy as np

import jaxinfer
from jaxinfer.engine import Engine

from testlib import tiny_model_config

CFG = tiny_model_config()


def test_64_requests_arriving_over_time_match_generate_one_at_a_time(model):
  rng = np.random.default_rng(0)
  n = 64
  prompt_lens = rng.integers(1, 46, size=n)
  new_lens = rng.integers(1, 17, size=n)
  prompts = [rng.integers(0, CFG.vocab_size, size=int(L)).tolist() for L in prompt_lens]
  # the reference: jaxinfer.generate on each request alone (no batching at all)
  expected = [jaxinfer.generate(model, [p], int(k))[0] for p, k in zip(prompts, new_lens)]

  # a pool of 24 pages of 4 tokens holds ~2 long requests: preemption is unavoidable
  engine = Engine(model, max_batch_size=8, page_size=4, num_pages=24, max_step_tokens=32, min_token_bucket=8,
                  max_queue=64)
  got: dict[int, list[int]] = {}
  index_of = {}
  reasons = {}
  arrived = 0
  steps = 0
  while arrived < n or engine.has_unfinished():
    if arrived < n and steps % 6 == 0:  # a burst of requests every few steps, while others run
      for i in range(arrived, min(n, arrived + 11)):
        index_of[engine.add_request(prompts[i], max_new_tokens=int(new_lens[i]))] = i
      arrived = min(n, arrived + 11)
    for out in engine.step():
      got.setdefault(index_of[out.request_id], []).extend(out.new_token_ids)
      if out.finished:
        reasons[index_of[out.request_id]] = out.finish_reason
    steps += 1
    assert steps < 2000, "engine does not make progress"

  for i in range(n):
    assert got[i] == expected[i], f"request {i}: prompt {prompt_lens[i]} tokens, {new_lens[i]} new"
  assert reasons == {i: "length" for i in range(n)}
  assert engine.stats["preemptions"] > 0, engine.stats
  assert engine.stats["partial_prefills"] > 0, engine.stats  # chunked prefill happened
  assert engine.stats["max_step_seqs"] > 1, engine.stats  # batching happened
  assert engine.allocator.num_free == engine.num_pages  # every page came back
  engine.allocator.check_consistency()
  assert 0 < engine.compilations <= engine.max_programs


def test_compilations_bounded_by_buckets(model):
  engine = Engine(model, max_batch_size=4, page_size=8, num_pages=64, max_step_tokens=32, min_token_bucket=16)
  assert engine.token_buckets == (16, 32) and engine.seq_buckets == (4,)
  engine.warmup()
  assert engine.compilations <= engine.max_programs == 2
  before = jaxinfer.engine.compilation_count()
  rng = np.random.default_rng(1)
  # many different prompt lengths, output lengths and batch compositions: no new program
  prompts = [rng.integers(0, CFG.vocab_size, size=int(L)).tolist() for L in rng.integers(1, 60, size=10)]
  engine.run(prompts, max_new_tokens=5, progress=False)
  engine.run(prompts[:3], max_new_tokens=9, progress=False)
  assert jaxinfer.engine.compilation_count() == before


def test_sliding_window_model_matches_generate():
  model = jaxinfer.init_model(CFG.replace(sliding_window=5), seed=11)
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, CFG.vocab_size, size=int(L)).tolist() for L in (3, 13, 22, 9, 17)]
  expected = [jaxinfer.generate(model, [p], 12)[0] for p in prompts]
  engine = Engine(model, max_batch_size=4, page_size=4, num_pages=12, max_step_tokens=16, min_token_bucket=16)
  assert engine.run(prompts, max_new_tokens=12, progress=False) == expected
  assert engine.stats["preemptions"] > 0 and engine.stats["partial_prefills"] > 0
