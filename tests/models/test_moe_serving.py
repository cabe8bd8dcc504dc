"""Serving MoE models: the Engine's greedy outputs equal jaxinfer.generate's, on one device and with the experts
sharded over an expert axis of 4 (the model's blocks dispatch with all-to-all)."""

import jax
import numpy as np
import pytest
from flax import nnx

import jaxinfer
from jaxinfer.engine import Engine
from jaxinfer.models.moe import use_expert_parallel
from parallel.mesh import create_mesh
from parallel.sharding import DEFAULT_RULES, state_shardings
from testlib import tiny_model_config


def _run(engine, prompts, new):
  ids = {engine.add_request(p, max_new_tokens=new): i for i, p in enumerate(prompts)}
  got = {}
  for _ in range(500):
    for out in engine.step():
      got.setdefault(ids[out.request_id], []).extend(out.new_token_ids)
    if not engine.has_unfinished():
      break
  return [got[i] for i in range(len(prompts))]


@pytest.mark.parametrize("expert_axis", [1, 4])
def test_engine_matches_generate(expert_axis):
  cfg = tiny_model_config(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                          moe_intermediate_size=32, shared_expert_intermediate_size=48)
  model = jaxinfer.init_model(cfg, seed=1)
  rng = np.random.default_rng(4)
  prompts = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in (7, 1, 12, 4)]
  want = jaxinfer.generate(model, prompts, max_new_tokens=9)
  if expert_axis > 1:
    mesh = create_mesh(dict(expert=expert_axis), devices=jax.devices()[:expert_axis])
    graphdef, state = nnx.split(model)
    model = use_expert_parallel(nnx.merge(graphdef, jax.device_put(state, state_shardings(state, DEFAULT_RULES,
                                                                                          mesh))), mesh)
    assert jaxinfer.generate(model, prompts, max_new_tokens=9) == want
  engine = Engine(model, max_batch_size=4, page_size=4, num_pages=32, max_step_tokens=16, min_token_bucket=8)
  assert _run(engine, prompts, 9) == want
