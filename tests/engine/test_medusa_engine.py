"""Medusa in the engine (jaxinfer/engine/speculative/medusa.py, tree.py; tree attention in PagedKVCache):

- a candidate tree verified in one step gives exactly the tokens of decoding without it, greedy and sampled
  (exact acceptance follows the target's own per-position samples), under continuous batching with chunked
  prefill, prefix caching and forced preemption; an oracle places the right guess at a random rank of each
  head, so accepted paths run through later children and their k/v is moved into place;
- the guesses the proposer gets are the heads' top-k at the row that sampled the newest token;
- exact and typical acceptance against brute-force references on random trees;
- bad input: trees deeper than the heads, wider than the step budget, a quantized KV cache, missing heads."""

import zlib

import jax
import numpy as np
import pytest
from flax import nnx
from testlib import assert_same_or_near_tie, drive_with_arrivals, tiny_model_config

import jaxinfer
from jaxinfer.config import ConfigError
from jaxinfer.engine import Engine
from jaxinfer.engine.speculative.tree import accept_tree, tree_parents, tree_paths, typical_accept_tree
from jaxinfer.models.medusa import MedusaConfig, MedusaHeads

CFG = tiny_model_config()
SHAPE = dict(page_size=4, num_pages=40, max_batch_size=4, max_step_tokens=32, min_token_bucket=32,
             min_seq_bucket=4, enable_prefix_caching=True, max_model_len=64)
TREE = (3, 2)  # 3 + 6 nodes: 10 rows per verifying sequence


@pytest.fixture(scope="module")
def heads(model):
  h = MedusaHeads(MedusaConfig.for_model(model.config, num_heads=3), rngs=nnx.Rngs(3))
  h.init_from_base(model)
  h.res_kernel[...] = 0.05 * jax.random.normal(jax.random.key(4), h.res_kernel.shape)
  return h


def _medusa(heads, **fields):
  return jaxinfer.SpeculativeConfig(**{**dict(method="medusa", medusa_heads=heads, tree=TREE,
                                              num_speculative_tokens=9), **fields})


class Oracle:
  """Replaces the heads' guesses: with probability 0.8 the token the reference decodes next sits at a random
  rank of each head (junk at the others), else all junk."""

  def __init__(self, medusa, answers, rng):
    self.medusa, self.answers, self.rng = medusa, answers, rng

  def __call__(self, request, guesses):
    want = self.answers[tuple(request.prompt)]
    out = self.rng.integers(0, CFG.vocab_size, size=np.shape(guesses))
    done = len(request.output)
    for d in range(out.shape[0]):
      if done + d < len(want) and self.rng.random() < 0.8:
        out[d, self.rng.integers(0, out.shape[1])] = want[done + d]
    self.medusa.guesses[request.request_id] = (request.num_tokens, out)


def _workload(rng, n):
  prefix = rng.integers(0, CFG.vocab_size, size=13).tolist()
  prompts = [(prefix if i % 2 else []) + rng.integers(0, CFG.vocab_size, size=int(rng.integers(3, 20))).tolist()
             for i in range(n)]
  return prompts, [int(k) for k in rng.integers(4, 16, size=n)]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_tree_verification_is_lossless_under_batching_caching_and_preemption(model, heads, temperature):
  rng = np.random.default_rng(zlib.crc32(f"medusa-{temperature}".encode()))
  prompts, news = _workload(rng, 7)
  sampling = [jaxinfer.SamplingParams(temperature=temperature, seed=100 + i) for i in range(len(prompts))]
  plain = Engine(model, **SHAPE).run(prompts, sampling, max(news), progress=False)
  want = [p[:k] for p, k in zip(plain, news)]
  engine = Engine(model, speculative=_medusa(heads), **SHAPE)
  medusa = engine.scheduler.proposer.inner
  medusa.observe_head = Oracle(medusa, {tuple(p): w for p, w in zip(prompts, want)}, rng)
  moves = []
  move_slots = engine.runner.move_slots
  engine.runner.move_slots = lambda m: (moves.append(len(m)), move_slots(m))
  got = drive_with_arrivals(engine, prompts, news, rng, sampling)
  for i, (p, g, w) in enumerate(zip(prompts, got, want)):
    if temperature == 0:
      assert_same_or_near_tie(model, p, g, w, f"request {i}")
    else:
      assert g == w, f"request {i}: sampled tokens differ from decoding without the tree"
  st = engine.stats
  assert st["spec_accepted_tokens"] > 20 and st["steps"] < sum(news), st  # several tokens per step
  assert sum(moves) > 5, "no accepted path ran through a later child: the k/v moves were not exercised"
  assert engine.check_pages()["in_use"] == 0


def test_proposer_gets_the_heads_top_k_at_the_newest_tokens_row(model, heads):
  rng = np.random.default_rng(8)
  prompt = rng.integers(0, CFG.vocab_size, size=11).tolist()
  engine = Engine(model, speculative=_medusa(heads), **SHAPE)
  rid = engine.add_request(prompt, max_new_tokens=20)
  medusa = engine.scheduler.proposer.inner
  graphdef, state = nnx.split((model, heads))  # one jit per length (eagerly every op compiles on its own)
  last_row = jax.jit(lambda st, t: (lambda m, h: h(m(t, return_hidden=True)[:, -1]))(*nnx.merge(graphdef, st)))
  for _ in range(2):  # after the prefill, then after a verification step
    engine.step()
    request = engine._requests[rid]
    tokens = request.prompt + request.output
    # the heads at the row that sampled tokens[-1], the tree's two levels
    logits = np.asarray(last_row(state, np.asarray([tokens[:-1]])))[0, :2]
    count, guesses = medusa.guesses[rid]
    assert count == len(tokens)
    for d in range(2):  # the same top-k (a near-tie may swap two neighbours' order)
      top = set(np.argsort(logits[d])[::-1][:guesses.shape[1]].tolist())
      assert set(guesses[d].tolist()) == top or len(set(guesses[d].tolist()) & top) == len(top) - 1


def _random_tree(rng):
  counts = tuple(int(c) for c in rng.integers(1, 4, size=int(rng.integers(1, 4))))
  paths = tree_paths(counts)
  keep = max(1, int(rng.integers(1, len(paths) + 1)))
  return paths[:keep]


def _path_to(node, parents):
  path = []
  while node >= 0:
    path.append(node)
    node = parents[node]
  return path[::-1]


def test_acceptance_rules_against_brute_force():
  rng = np.random.default_rng(0)
  vocab = 5
  for trial in range(200):
    paths = _random_tree(rng)
    parents = tree_parents(paths)
    drafts = rng.integers(0, vocab, size=len(paths)).tolist()
    samples = rng.integers(0, vocab, size=len(paths) + 1).tolist()
    # exact: the deepest node whose whole path matches the samples at its parents (unique: siblings may repeat
    # a token, the first one is taken)
    ok = [n for n in range(len(paths)) if all(drafts[m] == samples[parents[m] + 1] and not any(
        drafts[c] == drafts[m] for c in range(m) if parents[c] == parents[m]) for m in _path_to(n, parents))]
    best = max(ok, key=lambda n: (len(paths[n]), -n), default=None)
    path = [] if best is None else _path_to(best, parents)
    tokens, got = accept_tree(drafts, parents, samples)
    assert got == path, (trial, paths, drafts, samples)
    assert tokens == [drafts[n] for n in path] + [samples[(path[-1] + 1) if path else 0]]
    # typical: the deepest node whose path is all above the threshold at each parent (ties: the first path)
    probs = rng.dirichlet(np.full(vocab, 0.5), size=len(paths) + 1)
    eps, alpha = 0.09 + 0.3 * rng.random(), 0.3
    entropy = -np.sum(probs * np.log(probs), axis=1)
    good = [n for n in range(len(paths)) if all(
        probs[parents[m] + 1, drafts[m]] > min(eps, alpha * np.exp(-entropy[parents[m] + 1]))
        for m in _path_to(n, parents))]
    best = max(good, key=lambda n: (len(paths[n]), -n), default=None)
    path = [] if best is None else _path_to(best, parents)
    tokens, got = typical_accept_tree(drafts, parents, samples, probs, eps, alpha)
    assert got == path and tokens[:-1] == [drafts[n] for n in path]


def test_typical_acceptance_runs_at_temperature_one(model, heads):
  # (at temperature 0 typical acceptance is exact matching: the lossless test's code path)
  rng = np.random.default_rng(2)
  prompt = rng.integers(0, CFG.vocab_size, size=9).tolist()
  engine = Engine(model, speculative=_medusa(heads, acceptance="typical", typical_threshold=0.3), **SHAPE)
  accepted = []
  typical = engine.scheduler.proposer.inner.typical
  assert typical == (0.3, 0.3)
  import jaxinfer.engine.output as output_lib

  rule = output_lib.typical_accept_tree
  output_lib.typical_accept_tree = lambda *a: (lambda r: (accepted.append(len(r[1])), r)[1])(rule(*a))
  try:
    out = engine.run([prompt], jaxinfer.SamplingParams(temperature=1.0, seed=3), max_new_tokens=12,
                     progress=False)[0]
  finally:
    output_lib.typical_accept_tree = rule
  assert len(out) == 12 and all(0 <= t < CFG.vocab_size for t in out)
  assert accepted and len(accepted) == engine.stats["spec_verify_steps"]  # every verification was typical
  assert sum(accepted) == engine.stats["spec_accepted_tokens"] and engine.check_pages()["in_use"] == 0


def test_bad_medusa_config(model, heads, tmp_path):
  spec = jaxinfer.SpeculativeConfig
  with pytest.raises(ConfigError, match=r"^engine\.speculative\.medusa_heads: method 'medusa' needs the heads"):
    spec(method="medusa")
  with pytest.raises(ConfigError, match=r"^engine\.speculative\.tree: path \(1, 0\) has no parent path \(1,\)"):
    spec(method="medusa", medusa_heads=heads, tree=((0,), (1, 0)))
  with pytest.raises(ConfigError, match=r"^engine\.speculative\.adaptive: not for method 'medusa'"):
    spec(method="medusa", medusa_heads=heads, adaptive=True)
  with pytest.raises(ConfigError, match=r"^engine\.speculative\.acceptance: 'typical' is Medusa's"):
    spec(method="ngram", acceptance="typical")
  with pytest.raises(ConfigError, match=r"^engine\.speculative\.tree: depth 4 needs 4 Medusa heads"):
    Engine(model, speculative=_medusa(heads, tree=(1, 1, 1, 1)), **SHAPE)
  with pytest.raises(ConfigError, match=r"^engine\.speculative\.num_speculative_tokens: k=40 needs k \+ 1 = 41 "
                                        r"rows, more than max_step_tokens=32"):  # a tree wider than the step
    Engine(model, speculative=_medusa(heads, tree=(8, 4), num_speculative_tokens=40), **SHAPE)
  with pytest.raises(ConfigError, match=r"^engine\.speculative\.method: 'medusa' needs a full-precision KV"):
    Engine(model, speculative=_medusa(heads), kv_cache_dtype="int8", **SHAPE)
  with pytest.raises(ConfigError, match=r"^engine\.speculative\.medusa_heads: .*not found.*experiments/medusa\.py"):
    Engine(model, speculative=_medusa(str(tmp_path)), **SHAPE)
  other = MedusaHeads(MedusaConfig(num_heads=2, hidden_size=CFG.hidden_size, vocab_size=96), rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match=r"^engine\.speculative\.medusa_heads: the heads have vocab_size=96"):
    Engine(model, speculative=_medusa(other), **SHAPE)
