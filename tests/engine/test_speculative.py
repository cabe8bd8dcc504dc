"""Speculative decoding in the engine (jaxinfer/engine/speculative/): every method's greedy output is exactly
plain greedy's under continuous batching with chunked prefill, prefix caching and forced preemption; the
config's bad input; drafts clipped to the context left; speculative sampling's acceptance rule on its own."""

import zlib

import numpy as np
import pytest
from testlib import assert_same_or_near_tie, drive_with_arrivals, tiny_model_config

import jaxinfer
from jaxinfer.config import ConfigError
from jaxinfer.engine import Engine, EngineConfig
from jaxinfer.engine.speculative.sampling import speculative_accept

CFG = tiny_model_config()
# one token bucket and one sequence bucket: few step programs, shared by every test of this file
# (the same shapes as generate(speculative=) picks for 4 short prompts: that test reuses the programs)
SHAPE = dict(page_size=16, num_pages=16, max_batch_size=4, max_step_tokens=32, min_token_bucket=32,
             min_seq_bucket=4, enable_prefix_caching=True, max_model_len=64)


@pytest.fixture(scope="module")
def draft():
  return jaxinfer.init_model(tiny_model_config(num_layers=1, hidden_size=32, intermediate_size=64), seed=11)


def _references(model, prompts, news):
  """Plain greedy for every prompt, in one batched generate call (one program), cut to each request's length."""
  out = jaxinfer.generate(model, prompts, max(news))
  return [o[:k] for o, k in zip(out, news)]


def _workload(rng, n):
  """Prompts sharing prefixes (prefix caching), some repetitive (so prompt lookup finds n-grams)."""
  prefix = rng.integers(0, CFG.vocab_size, size=21).tolist()
  prompts = []
  for i in range(n):
    unit = rng.integers(0, CFG.vocab_size, size=int(rng.integers(2, 5))).tolist()
    own = unit * int(rng.integers(2, 5)) if i % 2 else rng.integers(0, CFG.vocab_size, size=5).tolist()
    prompts.append((prefix[:int(rng.integers(10, 22))] if i % 3 else []) + own)
  return prompts, [int(k) for k in rng.integers(3, 14, size=n)]


METHODS = {
    "draft-same": dict(method="draft", num_speculative_tokens=3),  # draft = target: every draft accepted
    "draft-small": dict(method="draft", num_speculative_tokens=3, adaptive=True),  # most drafts rejected
    "ngram": dict(method="ngram", num_speculative_tokens=3, ngram_max=3, ngram_min=1),
    "ngram-adaptive": dict(method="ngram", num_speculative_tokens=3, ngram_max=2, adaptive=True),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_greedy_matches_generate_under_batching_caching_and_preemption(model, draft, name):
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  fields = dict(METHODS[name])
  if fields["method"] == "draft":
    fields["draft_model"] = model if name == "draft-same" else draft
  engine = Engine(model, speculative=jaxinfer.SpeculativeConfig(**fields), **SHAPE)
  prompts, news = _workload(rng, 7)
  got = drive_with_arrivals(engine, prompts, news, rng)
  for i, (p, want) in enumerate(zip(prompts, _references(model, prompts, news))):
    assert_same_or_near_tie(model, p, got[i], want, f"{name}: request {i}")
  st = engine.stats
  assert engine.check_pages()["in_use"] == 0
  assert st["spec_verify_steps"] > 0 and 0 <= st["spec_accepted_tokens"] <= st["spec_draft_tokens"]
  if name == "draft-same":
    assert st["spec_accepted_tokens"] == st["spec_draft_tokens"]  # the draft is the target: all agree
    assert st["steps"] < sum(news)  # several tokens per step
  assert st["spec_draft_tokens"] > 0  # drafts were verified (prompt lookup: the repetitive prompts' n-grams)
  if name == "draft-same":  # the draft engine's pool is consistent too
    engine.scheduler.proposer.inner.engine.check_pages()


def test_generate_with_speculative_matches_generate(model, draft):
  rng = np.random.default_rng(21)
  prompts = [rng.integers(0, CFG.vocab_size, size=int(n)).tolist() for n in (3, 11, 6, 9)]
  want = jaxinfer.generate(model, prompts, 24)
  for spec in (jaxinfer.SpeculativeConfig(method="draft", num_speculative_tokens=3, draft_model=draft),):
    got = jaxinfer.generate(model, prompts, 24, speculative=spec)
    for p, g, w in zip(prompts, got, want):
      assert_same_or_near_tie(model, p, g, w, spec.method)


def test_drafts_are_clipped_to_the_context_left(model):
  # a request ending exactly at max_model_len: k = 3 would run past it; drafts are clipped, tokens unchanged
  rng = np.random.default_rng(5)
  unit = rng.integers(0, CFG.vocab_size, size=3).tolist()
  prompt = unit * 18  # 54 tokens, repetitive: prompt lookup always has a proposal
  engine = Engine(model, speculative=jaxinfer.SpeculativeConfig(method="ngram", num_speculative_tokens=3), **SHAPE)
  got = engine.run([prompt], max_new_tokens=64 - len(prompt), progress=False)[0]
  assert_same_or_near_tie(model, prompt, got, _references(model, [prompt], [64 - len(prompt)])[0], "clipped")
  assert engine.stats["spec_draft_tokens"] > 0 and engine.check_pages()["in_use"] == 0


def test_bad_speculative_config(model):
  spec = jaxinfer.SpeculativeConfig
  with pytest.raises(ConfigError, match=r"^engine\.speculative\.method: 'eagle' is not one of"):
    spec(method="eagle")
  with pytest.raises(ConfigError, match=r"^engine\.speculative\.num_speculative_tokens: must be a positive"):
    spec(num_speculative_tokens=0)
  with pytest.raises(ConfigError, match=r"^engine\.speculative\.draft_model: method 'draft' needs a draft"):
    spec(method="draft")
  with pytest.raises(ConfigError, match=r"^engine\.speculative\.ngram_min: ngram_min=3 must be <= ngram_max=2"):
    spec(ngram_max=2, ngram_min=3)
  other_vocab = jaxinfer.init_model(tiny_model_config(vocab_size=96, num_layers=1), seed=1)
  with pytest.raises(ConfigError, match=r"^engine\.speculative\.draft_model: the draft's vocab_size=96 differs "
                                        r"from the target's vocab_size=128"):
    Engine(model, speculative=spec(method="draft", draft_model=other_vocab), **SHAPE)
  with pytest.raises(ConfigError, match=r"^engine\.speculative\.num_speculative_tokens: k=40 needs k \+ 1 = 41 "
                                        r"rows, more than max_step_tokens=32"):
    Engine(model, speculative=spec(num_speculative_tokens=40), **SHAPE)
  # the section form: a dict (or ml-collections section) becomes a SpeculativeConfig, errors naming the field
  cfg = EngineConfig(speculative=dict(method="ngram", num_speculative_tokens=2))
  assert cfg.speculative == spec(method="ngram", num_speculative_tokens=2)
  with pytest.raises(ConfigError, match=r"^engine\.speculative\.colour: unknown field"):
    EngineConfig(speculative=dict(colour=1))
  # a config file's engine section with a speculative sub-section (--config.engine.speculative.* overrides it)
  section = jaxinfer.config.engine_section(speculative=spec(method="ngram", num_speculative_tokens=5))
  section.speculative.ngram_max = 4
  got = jaxinfer.config.from_section(EngineConfig, section, "engine").speculative
  assert (got.num_speculative_tokens, got.ngram_max) == (5, 4)
  section.speculative.ngram_min = 9
  with pytest.raises(ConfigError, match=r"^engine\.speculative\.ngram_min: ngram_min=9 must be <= ngram_max=4"):
    jaxinfer.config.from_section(EngineConfig, section, "engine")


def test_speculative_accept_gives_the_target_distribution():
  # the rule alone, many draws: the first output token ~ p whatever q is (Leviathan et al., Theorem 1)
  rng = np.random.default_rng(0)
  vocab, n = 6, 20000
  p = rng.dirichlet(np.ones(vocab))
  q = rng.dirichlet(np.ones(vocab) * 0.5)
  drafts = rng.choice(vocab, size=n, p=q)
  first = np.array([speculative_accept([int(x)], q[None], p[None], bonus=-1, seed=s, first_position=3)[0]
                    for s, x in enumerate(drafts)])
  counts = np.bincount(first, minlength=vocab)
  # chi-square with vocab - 1 = 5 degrees of freedom; 20.5 is its 0.999 quantile
  chi2 = float(np.sum((counts - n * p) ** 2 / (n * p)))
  assert chi2 < 20.5, (chi2, counts / n, p)
  accepted = np.mean(first == drafts)
  assert abs(accepted - np.minimum(p, q).sum()) < 0.02  # acceptance rate 1 - TV(p, q)
  assert speculative_accept([2, 4], np.eye(vocab)[[2, 4]], np.eye(vocab)[[2, 4, 1]], bonus=1, seed=0,
                            first_position=0) == [2, 4, 1]  # all accepted: the bonus token follows
