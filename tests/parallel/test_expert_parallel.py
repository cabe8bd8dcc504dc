"""Expert parallelism on 8 forced host devices: expert = 2, 4, 8 and expert x data give the one-device
forward, gradients and greedy generation; experts are really sharded and dispatched by all-to-all."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxinfer
from jaxinfer.models.moe import use_expert_parallel
from parallel.expert_parallel import expert_parallel
from parallel.mesh import ParallelConfigError, create_mesh
from parallel.sharding import DEFAULT_RULES, state_shardings
from testlib import assert_close, tiny_model_config

MESHES = {"expert2": (dict(expert=2), 2), "expert4": (dict(expert=4), 4), "expert8": (dict(expert=8), 8),
          "expert2xdata4": (dict(expert=2, data=4), 8)}


def _loss_fn(graphdef):
  def loss(st, t):
    logits = nnx.merge(graphdef, st)(t)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * jnp.cos(jnp.arange(t.shape[1]))), logits

  return jax.jit(jax.value_and_grad(loss, has_aux=True))  # one program: loss, logits and every gradient


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_model_config(model_type="mixtral", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
  model = jaxinfer.init_model(cfg, seed=3)
  graphdef, state = nnx.split(model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, size=(4, 11)))  # 44: pads for 8
  return model, graphdef, state, tokens, _loss_fn(graphdef)(state, tokens)


def _mesh(name):
  section, n = MESHES[name]
  return create_mesh(section, devices=jax.devices()[:n])


@pytest.mark.parametrize("name", sorted(MESHES))
def test_forward_and_gradients_equal_one_device(setup, name):
  model, graphdef, state, tokens, ((ref_loss, ref_logits), ref_grads) = setup
  mesh = _mesh(name)
  sharded = jax.device_put(state, state_shardings(state, DEFAULT_RULES, mesh))
  spec = sharded["layers"][0]["mlp"]["experts"]["gate_proj"].get_value().sharding.spec
  assert spec[0] == "expert", spec
  with expert_parallel(mesh):  # traced inside: the MoE blocks dispatch over `expert`
    compiled = _loss_fn(graphdef).lower(sharded, tokens).compile()
  assert "all-to-all" in compiled.as_text()
  (loss, logits), grads = compiled(sharded, tokens)
  assert_close(logits, ref_logits, 1e-5, f"{name} logits")
  assert_close(loss, ref_loss, 1e-5, f"{name} loss")
  flat_ref = jax.tree_util.tree_leaves(ref_grads)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), flat_ref, strict=True):
    assert_close(g, r, 1e-5, f"{name} grad {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("name", ["expert2xdata4"])  # (test-time budget: one mesh; forward/grads cover all)
def test_greedy_generation_equals_one_device(setup, name):
  model, graphdef, state, *_ = setup
  mesh = _mesh(name)
  prompts = [[5, 9, 2], [7] * 9, [1]]
  want = jaxinfer.generate(model, prompts, max_new_tokens=32)
  ep_model = use_expert_parallel(nnx.merge(graphdef, jax.device_put(state, state_shardings(state, DEFAULT_RULES,
                                                                                            mesh))), mesh)
  assert jaxinfer.generate(ep_model, prompts, max_new_tokens=32) == want


def test_experts_must_divide_the_expert_axis():
  cfg = tiny_model_config(model_type="mixtral", num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16)
  model = use_expert_parallel(jaxinfer.init_model(cfg), _mesh("expert4"))
  with pytest.raises(ParallelConfigError, match="mesh.expert: 6 experts"):
    jax.eval_shape(lambda t: model(t), jnp.zeros((1, 4), jnp.int32))
