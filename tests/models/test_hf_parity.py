"""Numerical parity with Hugging Face transformers (PyTorch, CPU, eager attention) for every family.

Tolerance: float32 logits within 1e-4 relative error (max abs difference / max abs reference logit); both
sides compute in float32, so differences are summation-order rounding only.
"""

import numpy as np
import pytest

import jaxinfer
from hf_reference import FAMILIES, hf_greedy, hf_logits, rel_err, saved_family

REL_TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  return saved_family(request.param, tmp_path_factory)


def test_logits_match(family):
  name, hf, _, model = family
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, hf.config.vocab_size, size=(2, 29)).tolist()  # longer than the Mistral window
  ours = model(np.asarray(tokens))
  assert rel_err(ours, hf_logits(hf, tokens)) < REL_TOL, name


def test_greedy_generation_matches(family):
  name, hf, _, model = family
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, hf.config.vocab_size, size=n).tolist() for n in (5, 13, 1, 9)]
  ours = jaxinfer.generate(model, prompts, max_new_tokens=32)
  for prompt, got in zip(prompts, ours):
    assert got == hf_greedy(hf, prompt, 32), name


def test_save_hf_round_trip(family, tmp_path):
  import transformers

  name, hf, _, model = family
  jaxinfer.save_hf(model, tmp_path / "export")
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
  tokens = np.random.default_rng(3).integers(0, hf.config.vocab_size, size=(1, 17)).tolist()
  ours = model(np.asarray(tokens))
  assert rel_err(ours, hf_logits(back, tokens)) < REL_TOL, name
  reloaded = jaxinfer.load_hf(tmp_path / "export")
  again = reloaded(np.asarray(tokens))
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(again))
