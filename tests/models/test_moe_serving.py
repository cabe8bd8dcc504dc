"""Serving MoE models: the Engine's greedy outputs equal jaxinfer.generate's, on one device and with the experts
sharded over an expert axis of 4 (the model's blocks dispatch with all-to-all)."""

import jax
import numpy as np
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


def test_engine_matches_generate():
  # one model and one reference decode serve both layouts (each of them would build and decode the same)
  cfg = tiny_model_config(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                          moe_intermediate_size=32, shared_expert_intermediate_size=48)
  model = jaxinfer.init_model(cfg, seed=1)
  rng = np.random.default_rng(4)
  prompts = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in (7, 1, 12, 4)]
  want = jaxinfer.generate(model, prompts, max_new_tokens=9)
  # every step one padded shape (16 tokens): one step program per layout; the 24 prompt tokens still take two
  # chunked-prefill steps
  shape = dict(max_batch_size=4, page_size=4, num_pages=32, max_step_tokens=16, min_token_bucket=16)
  assert _run(Engine(model, **shape), prompts, 9) == want, "one device"

  mesh = create_mesh(dict(expert=4), devices=jax.devices()[:4])
  graphdef, state = nnx.split(model)
  sharded = use_expert_parallel(nnx.merge(graphdef, jax.device_put(state, state_shardings(state, DEFAULT_RULES,
                                                                                           mesh))), mesh)
  assert jaxinfer.generate(sharded, prompts, max_new_tokens=9) == want, "generate, expert axis 4"
  assert _run(Engine(sharded, **shape), prompts, 9) == want, "engine, expert axis 4"
