"""A KV policy's narrow page table (EvictionPolicy.decode_table_pages): H2O's steps whose requests all hold at
most ceil(budget / page_size) + 2 pages run a second step program that reads only that many page-table
columns. Against h2o_wide (H2O with the full-width table only), over random arrivals, prompt lengths and
forced preemptions in a pool small enough to defer compactions: the same greedy tokens and log p, with steps
really run in both widths (decode steps in the wide one too), and two table widths compiled, no more."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import jaxinfer
from jaxinfer.engine import step as step_lib
from jaxinfer.engine.kv_policies import KVPolicyConfig
from jaxinfer.generation.sampling import SamplingParams
from testlib import tiny_model_config

PS, BUDGET, WINDOW, MAX_LEN = 8, 20, 6, 128
FULL, NARROW = MAX_LEN // PS, -(-BUDGET // PS) + 2


@pytest.fixture(scope="module")
def model():
  return jaxinfer.Transformer(tiny_model_config(dtype="float32", max_position_embeddings=512), rngs=nnx.Rngs(3))


def _drive(model, name, seed, **kw):
  """Random arrivals (6 prompts of 9..60 tokens) and forced preemptions; records each dispatched step's
  page-table width and whether it held a decode row. Returns (engine, tokens, log p, [(width, decodes)])."""
  engine = jaxinfer.Engine(model, max_batch_size=3, page_size=PS, max_step_tokens=16, min_token_bucket=16,
                           max_model_len=MAX_LEN, num_pages=14, enable_prefix_caching=True,
                           kv_policy=KVPolicyConfig(name=name, window=WINDOW, budget=BUDGET), **kw)
  steps = []
  dispatch = engine.runner.dispatch

  def recording(built, *args, **kwargs):
    decodes = any(s.num_tokens == 1 and s.start >= len(s.request.prompt) for s in built.seqs)
    steps.append((built.table_pages, decodes))
    assert built.batch.attn.group_table is None  # no prefix groups with a policy (their width would follow)
    return dispatch(built, *args, **kwargs)

  engine.runner.dispatch = recording
  if kw.get("separate_compile"):
    engine.warmup()  # every shape in both widths: driving must compile nothing more
  compiled = step_lib.compilation_count()
  rng = np.random.default_rng(seed)
  lens, news = rng.integers(9, 61, 6), rng.integers(8, 21, 6)
  prompts = [rng.integers(1, model.config.vocab_size, int(n)).tolist() for n in lens]
  index_of, tokens, logps, arrived = {}, {}, {}, 0
  while arrived < len(prompts) or engine.has_unfinished():
    if arrived < len(prompts) and rng.random() < 0.5:
      rid = engine.add_request(prompts[arrived], SamplingParams(logprobs=True), max_new_tokens=int(news[arrived]))
      index_of[rid] = arrived
      arrived += 1
    if engine.num_running > 1 and rng.random() < 0.1:
      engine.preempt(engine.scheduler.running[int(rng.integers(0, engine.num_running))].request_id)
    for out in engine._checked_step():
      tokens.setdefault(index_of[out.request_id], []).extend(out.new_token_ids)
      logps.setdefault(index_of[out.request_id], []).extend(out.logprobs)
    engine.check_pages()
  if kw.get("separate_compile"):
    assert step_lib.compilation_count() == compiled, "warmup missed a table width"
  return engine, [tokens[i] for i in range(6)], [logps[i] for i in range(6)], steps


def test_narrow_table_matches_full_width(model):
  narrow, tok_n, lp_n, steps_n = _drive(model, "h2o", 1, separate_compile=True)
  wide, tok_w, lp_w, steps_w = _drive(model, "h2o_wide", 1)
  assert narrow.kv_policy.decode_table_pages(FULL) == NARROW and wide.kv_policy.decode_table_pages(FULL) is None
  assert tok_n == tok_w and all(len(t) > 0 for t in tok_n)
  err = max(abs(a - b) for x, y in zip(lp_n, lp_w) for a, b in zip(x, y, strict=True))
  assert err < 1e-5
  # both widths really ran, decode steps in each (the wide one: deferred compactions, long prefills beside)
  assert {w for w, _ in steps_w} == {FULL} and wide.stats["narrow_table_steps"] == 0
  assert {w for w, _ in steps_n} == {FULL, NARROW}
  assert narrow.stats["narrow_table_steps"] == sum(w == NARROW for w, _ in steps_n) > 0
  assert any(d for w, d in steps_n if w == NARROW) and any(d for w, d in steps_n if w == FULL)
  assert narrow.kv_policy.stats["deferred_compactions"] > 0 and narrow.stats["preemptions"] > 0
  assert narrow.kv_policy.stats == wide.kv_policy.stats  # the same evictions and compactions, step for step
  # two table widths of every step shape, and no more
  assert narrow.max_programs == 2 * wide.max_programs
  assert {k[2] if len(k) == 3 else FULL for k in narrow.runner._shapes_seen} == {FULL, NARROW}
  assert narrow.compilations <= narrow.max_programs
