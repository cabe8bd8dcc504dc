"""Generation and the model's cache/packing paths, checked against plain full forwards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from flax import nnx
from jaxinfer.generation import compilation_count
from jaxinfer.models.kv_cache import KVCache

CFG = jaxinfer.ModelConfig(vocab_size=101, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4,
                           num_kv_heads=1, max_position_embeddings=128, initializer_range=0.2, sliding_window=None)


@pytest.fixture(scope="module")
def model():
  return jaxinfer.init_model(CFG, seed=3)


@nnx.jit
def forward(model, tokens, positions=None, segment_ids=None):
  return model(tokens, positions, segment_ids)


def reference_greedy(model, prompt, n):
  """Greedy decoding by re-running the full forward over the whole sequence each step (no cache).

  The sequence is right-padded to a fixed length: causal attention makes the padding invisible to the
  positions read, and one compiled program serves every step."""
  seq = list(prompt)
  for _ in range(n):
    padded = jnp.asarray([seq + [0] * (64 - len(seq))])
    seq.append(int(jnp.argmax(forward(model, padded)[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_cached_decode_matches_full_forward(model):
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, size=(2, 11)))
  full = forward(model, tokens)
  cache = KVCache.create(CFG, 2, 16)
  prefill, cache = model(tokens[:, :7], cache=cache)
  steps = [prefill]
  for i in range(7, 11):
    step_logits, cache = model(tokens[:, i:i + 1], cache=cache)
    steps.append(step_logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5, rtol=2e-5)


def test_packed_segments_do_not_attend_across(model):
  rng = np.random.default_rng(1)
  a, b = rng.integers(0, CFG.vocab_size, size=5), rng.integers(0, CFG.vocab_size, size=8)
  packed = jnp.asarray(np.concatenate([a, b])[None])
  positions = jnp.asarray(np.concatenate([np.arange(5), np.arange(8)])[None])
  segments = jnp.asarray(np.array([0] * 5 + [1] * 8)[None])
  logits = forward(model, packed, positions, segments)
  alone_a = forward(model, jnp.asarray(a[None]))
  alone_b = forward(model, jnp.asarray(b[None]))
  np.testing.assert_allclose(logits[:, :5], alone_a, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(logits[:, 5:], alone_b, atol=2e-5, rtol=2e-5)


def test_batched_greedy_equals_one_at_a_time_reference(model):
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, CFG.vocab_size, size=n).tolist() for n in (3, 17, 8)]
  batched = jaxinfer.generate(model, prompts, max_new_tokens=12)
  for prompt, got in zip(prompts, batched):
    assert got == reference_greedy(model, prompt, 12)


def test_bounded_compilations_across_prompt_lengths(model):
  rng = np.random.default_rng(3)
  jaxinfer.generate(model, [[1, 2, 3]], max_new_tokens=10)
  before = compilation_count()
  # every length below maps to the same (batch, prompt, new-token) buckets: no new program, and the
  # decode loop runs on device, so no retrace per token either
  for n in (2, 5, 9, 16):
    out = jaxinfer.generate(model, [rng.integers(0, CFG.vocab_size, size=n).tolist()], max_new_tokens=7 + n % 3)
    assert 7 <= len(out[0]) <= 9
  assert compilation_count() == before
  jaxinfer.generate(model, [[1] * 40], max_new_tokens=10)  # a longer prompt bucket compiles exactly once more
  assert compilation_count() == before + 1


def test_stop_token_ends_sequence_and_is_included(model):
  prompt = [5, 6, 7]
  free = jaxinfer.generate(model, [prompt], max_new_tokens=10)[0]
  stop = free[3]
  first = free.index(stop)
  stopped = jaxinfer.generate(model, [prompt, [9, 9]], max_new_tokens=10, stop_token_ids=(stop,))
  assert stopped[0] == free[:first + 1]


def test_sampling_is_seeded_and_top_k_one_is_greedy(model):
  prompts = [[1, 2, 3], [4, 5]]
  hot = jaxinfer.SamplingParams(temperature=1.5, seed=7)
  a = jaxinfer.generate(model, prompts, 16, sampling=hot)
  b = jaxinfer.generate(model, prompts, 16, sampling=hot)
  c = jaxinfer.generate(model, prompts, 16, sampling=jaxinfer.SamplingParams(temperature=1.5, seed=8))
  assert a == b and a != c
  greedy = jaxinfer.generate(model, prompts, 16)
  assert jaxinfer.generate(model, prompts, 16, sampling=jaxinfer.SamplingParams(temperature=2.0, top_k=1)) == greedy
  assert jaxinfer.generate(model, prompts, 16, sampling=jaxinfer.SamplingParams(temperature=2.0, top_p=1e-6)) == greedy


def test_sampling_filters_respect_their_sets():
  from jaxinfer.generation.sampling import sample_tokens

  sample_tokens = jax.jit(sample_tokens)

  logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
  keys = jax.random.split(jax.random.key(1), 4)
  top5 = set()
  for i in range(40):
    toks = sample_tokens(logits, jax.random.split(jax.random.key(i), 4), jnp.full(4, 1.0), jnp.full(4, 5, jnp.int32),
                         jnp.ones(4), jnp.zeros(4))
    top5 |= {(r, int(t)) for r, t in enumerate(toks)}
  allowed = {(r, int(t)) for r in range(4) for t in jnp.argsort(-logits[r])[:5]}
  assert top5 <= allowed and len(top5) > 4
  probs = jax.nn.softmax(logits, axis=-1)
  toks = sample_tokens(logits, keys, jnp.full(4, 1.0), jnp.zeros(4, jnp.int32), jnp.ones(4), jnp.full(4, 0.5))
  assert all(probs[r, t] >= 0.5 * probs[r].max() for r, t in enumerate(toks.tolist()))


def test_bfloat16_model_generates_close_to_float32(model, tmp_path):
  bf16 = jaxinfer.load_hf(jaxinfer.save_hf(model, tmp_path / "f32"), dtype="bfloat16")
  assert bf16.config.dtype == "bfloat16" and bf16.embed_tokens.embedding.get_value().dtype == jnp.bfloat16
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, CFG.vocab_size, size=(1, 9)))
  ref = forward(model, tokens)
  got = forward(bf16, tokens)
  assert got.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref))) < 0.05  # bf16: 8-bit mantissa
  out = jaxinfer.generate(bf16, [[1, 2, 3]], 8)
  assert len(out[0]) == 8
