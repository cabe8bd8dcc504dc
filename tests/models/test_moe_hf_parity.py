"""Mixtral / Qwen2-MoE / Qwen3-MoE parity with transformers (PyTorch, CPU, eager), as test_hf_parity.py does
for the dense families: float32 logits within 1e-4 relative error with the "dense" and "ragged" expert
implementations, greedy 32 tokens on unequal prompts, and a save_hf round trip."""

import jax
import numpy as np
import pytest
from flax import nnx

import jaxinfer
from hf_reference import MOE_FAMILIES, hf_greedy, hf_logits, rel_err, saved_family

REL_TOL = 1e-4


def forward(model, tokens):
  """model(tokens) under one jit (eagerly, every MoE op would compile on its own)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))(state, np.asarray(tokens))


@pytest.fixture(scope="module", params=sorted(MOE_FAMILIES))
def family(request, tmp_path_factory):
  return saved_family(request.param, tmp_path_factory)


def test_config_reads_the_moe_fields(family):
  name, hf, _, model = family
  cfg, c = model.config, hf.config
  assert cfg.num_experts == getattr(c, "num_local_experts", None) or cfg.num_experts == c.num_experts, name
  assert cfg.num_experts_per_tok == c.num_experts_per_tok
  moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
  hf_moe_layers = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]
  assert moe_layers == hf_moe_layers, name


def test_logits_match(family):
  name, hf, path, model = family
  tokens = np.random.default_rng(1).integers(0, hf.config.vocab_size, size=(2, 23)).tolist()
  expected = hf_logits(hf, tokens)
  assert model.config.moe_impl == "ragged"
  assert rel_err(forward(model, tokens), expected) < REL_TOL, (name, "ragged")
  dense = jaxinfer.load_hf(path, moe_impl="dense")
  assert rel_err(forward(dense, tokens), expected) < REL_TOL, (name, "dense")


def test_greedy_generation_matches(family):
  name, hf, _, model = family
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, hf.config.vocab_size, size=n).tolist() for n in (5, 13, 1)]
  ours = jaxinfer.generate(model, prompts, max_new_tokens=32)
  for prompt, got in zip(prompts, ours):
    assert got == hf_greedy(hf, prompt, 32), name


def test_save_hf_round_trip(family, tmp_path):
  import transformers

  name, hf, _, model = family
  jaxinfer.save_hf(model, tmp_path / "export")
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
  assert type(back) is type(hf)
  tokens = np.random.default_rng(3).integers(0, hf.config.vocab_size, size=(1, 17)).tolist()
  ours = forward(model, tokens)
  assert rel_err(ours, hf_logits(back, tokens)) < REL_TOL, name
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(forward(jaxinfer.load_hf(tmp_path / "export"), tokens)))


def test_sharded_load_reads_the_stacked_experts_into_their_shards(family):
  """load_hf(mesh=...) reads the per-expert HF tensors block by block (jaxinfer.checkpoint.hf._StackedExperts):
  the stacked expert kernels come out split over the tensor axis on their `mlp` dimension, equal to the
  unsharded load."""
  from parallel.mesh import create_mesh

  _, _, path, model = family
  mesh = create_mesh(dict(tensor=2), devices=jax.devices()[:2])
  sharded = jaxinfer.load_hf(path, mesh=mesh)
  layer = 1  # an MoE layer in every family (qwen2: sparse step 2; qwen3: layer 0 dense)
  kernel = sharded.layers[layer].mlp.experts.gate_proj.get_value()
  e, d, f = kernel.shape
  assert {s.data.shape for s in kernel.addressable_shards} == {(e, d, f // 2)}
  want = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  got = dict(nnx.to_flat_state(nnx.state(sharded, nnx.Param)))
  assert set(got) == set(want)
  for p in want:
    np.testing.assert_array_equal(np.asarray(got[p].get_value()), np.asarray(want[p].get_value()), err_msg=str(p))
