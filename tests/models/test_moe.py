"""MoE block: expert implementations against the dense reference (forward and gradients, an expert with no
tokens, dropped assignments), routing and capacity against numpy loops, router statistics, config errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxinfer
from jaxinfer.models import moe
from jaxinfer.models.moe_experts import IMPLEMENTATIONS, sorted_experts
from testlib import assert_close, randn, tiny_model_config

T, D, F, E, K = 13, 16, 24, 5, 2


@pytest.fixture(scope="module")
def problem():
  x = randn((T, D), "moe-x")
  w = [randn((E, D, F), "moe-wg") * 0.3, randn((E, D, F), "moe-wu") * 0.3, randn((E, F, D), "moe-wd") * 0.3]
  rng = np.random.default_rng(0)
  # Expert 3 receives no token; the sentinel id E marks two dropped assignments.
  ids = np.stack([rng.choice([0, 1, 2, 4], size=2, replace=False) for _ in range(T)]).astype(np.int32)
  ids[2, 1] = ids[7, 0] = E
  weights = jnp.asarray(rng.uniform(0.1, 1.0, size=(T, K)), jnp.float32)
  return x, jnp.asarray(ids), weights, w


def numpy_moe(x, ids, weights, w):
  x, ids, weights = np.asarray(x, np.float64), np.asarray(ids), np.asarray(weights, np.float64)
  wg, wu, wd = (np.asarray(a, np.float64) for a in w)
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    for j in range(ids.shape[1]):
      e = ids[t, j]
      if e < wg.shape[0]:
        h = x[t] @ wg[e]
        y[t] += weights[t, j] * ((h / (1 + np.exp(-h))) * (x[t] @ wu[e])) @ wd[e]
  return y


def _interpreted_pallas(lhs, rhs, group_sizes):
  import pallas_kernels

  return pallas_kernels.grouped_matmul(lhs, rhs, group_sizes, implementation=PALLAS_INTERPRET, interpret=True)


PALLAS_INTERPRET = "pallas_gpu"


@pytest.mark.parametrize("impl", ["dense", "ragged", "pallas", "pallas-interpret"])
def test_implementation_matches_reference_forward_and_grads(problem, impl):
  """"pallas" is the public moe_impl (pallas_kernels picks its implementation: xla on CPU); "pallas-interpret"
  forces the Pallas GPU kernel in interpret mode through the same sort / scatter code."""
  x, ids, weights, w = problem
  fn = sorted_experts(_interpreted_pallas) if impl == "pallas-interpret" else IMPLEMENTATIONS[impl]
  assert_close(fn(x, ids, weights, *w), numpy_moe(x, ids, weights, w), 1e-5, f"{impl} forward")

  def loss(x, weights, *w):
    return jnp.sum(jnp.sin(fn(x, ids, weights, *w)))

  def ref_loss(x, weights, *w):
    return jnp.sum(jnp.sin(IMPLEMENTATIONS["dense"](x, ids, weights, *w)))

  grads = jax.grad(loss, argnums=range(5))(x, weights, *w)
  ref = jax.grad(ref_loss, argnums=range(5))(x, weights, *w)
  for name, g, r in zip(("x", "weights", "w_gate", "w_up", "w_down"), grads, ref):
    assert_close(g, r, 1e-5, f"{impl} d{name}")
  assert float(jnp.max(jnp.abs(grads[2][3]))) == 0.0  # the idle expert gets no gradient
  assert float(jnp.max(jnp.abs(grads[2][0]))) > 0.0


def test_route_matches_numpy():
  logits = np.asarray(randn((T, E), "moe-logits"))
  for norm in (False, True):
    ids, weights, probs = moe.route(jnp.asarray(logits), K, norm)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1)[:, :K]
    want = np.take_along_axis(p, top, -1)
    if norm:
      want = want / want.sum(-1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(ids), top)
    np.testing.assert_allclose(np.asarray(weights), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(probs), p, rtol=1e-5)


@pytest.mark.parametrize("factor", [0.5, 1.0, 1.7])
def test_capacity_drops_like_gshard(factor):
  rng = np.random.default_rng(int(factor * 10))
  ids = np.stack([rng.choice(E, size=K, replace=False, p=[0.5, 0.2, 0.1, 0.1, 0.1]) for _ in range(T)])
  cap = moe.capacity(T, K, E, factor)
  assert cap == max(1, math.ceil(factor * T * K / E))
  kept, dropped = moe.apply_capacity(jnp.asarray(ids, jnp.int32), E, cap)
  want, used = ids.copy(), np.zeros(E, int)
  for j in range(K):  # first choices of every token before any second choice
    for t in range(T):
      if used[ids[t, j]] < cap:
        used[ids[t, j]] += 1
      else:
        want[t, j] = E
  np.testing.assert_array_equal(np.asarray(kept), want)
  assert int(dropped) == int(np.sum(want == E)) > 0
  assert moe.capacity(T, K, E, 0.0) is None


def test_router_statistics_match_numpy():
  logits = np.asarray(randn((T, E), "moe-stat-logits")) * 2
  ids, _, probs = moe.route(jnp.asarray(logits), K, True)
  stats = moe.router_statistics(jnp.asarray(logits), probs, ids, E)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  counts = np.bincount(np.argsort(-p, -1)[:, :K].ravel(), minlength=E)
  np.testing.assert_allclose(np.asarray(stats["expert_load"]), counts / (T * K), atol=1e-6)
  np.testing.assert_allclose(float(stats["load_balance_loss"]), E * np.sum(counts / T * p.mean(0)), rtol=1e-5)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(float(stats["z_loss"]), np.mean(lse ** 2), rtol=1e-5)


def test_capture_records_every_moe_layer():
  cfg = tiny_model_config(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                          num_layers=3, mlp_only_layers=(1,), capacity_factor=1.0)
  model = jaxinfer.init_model(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 9)))
  graphdef, state = nnx.split(model)
  logits, aux = jax.jit(lambda st, t: moe.capture_moe_aux(lambda m, t: m(t))(nnx.merge(graphdef, st), t))(
      state, tokens)
  plain = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))(state, tokens)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain))  # capturing changes nothing
  assert len(aux) == 2  # layers 0 and 2; layer 1 is dense
  cap = moe.capacity(18, 2, 4, 1.0)
  for stats in aux:
    counts = np.round(np.asarray(stats["expert_load"]) * 36)
    assert counts.sum() == 36
    assert float(stats["dropped"]) == float(np.sum(np.maximum(counts - cap, 0)))
  assert "moe_aux" not in str(jax.tree.structure(jax.tree.map(lambda v: 0, model)))  # nothing left behind


@pytest.mark.parametrize("field,value,match", [
    ("moe_impl", "sparse", "model.moe_impl"),
    ("num_experts_per_tok", 5, "model.num_experts_per_tok"),
    ("capacity_factor", -1.0, "model.capacity_factor"),
    ("mlp_only_layers", (7,), "model.mlp_only_layers"),
    ("decoder_sparse_step", 0, "model.decoder_sparse_step"),
])
def test_bad_moe_config_raises(field, value, match):
  with pytest.raises(jaxinfer.ConfigError, match=match):
    tiny_model_config(model_type="mixtral", num_experts=4, **{field: value})
