"""Loss masking, gradient accumulation, remat and mixed precision of the train step (single device)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxinfer.data.packing import Split
from jaxinfer.models import ModelConfig, Transformer
from jaxinfer.train.config import TrainConfig
from jaxinfer.train.flops import peak_flops_per_device, train_flops_per_token
from jaxinfer.train.loss import next_token_nll
from jaxinfer.train.optim import learning_rate_schedule
from jaxinfer.train.remat import apply_remat
from jaxinfer.train.step import eval_step, loss_and_grads

CFG = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=64)


def test_masked_nll_matches_a_direct_computation():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, size=(2, 5))
  mask = rng.integers(0, 2, size=(2, 5))
  nll, count = next_token_nll(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -sum(logp[b, s, targets[b, s]] for b in range(2) for s in range(5) if mask[b, s])
  assert float(nll) == pytest.approx(want, rel=1e-5) and float(count) == mask.sum()
  # masked positions cannot influence the loss, whatever their logits
  changed = logits.copy()
  changed[mask == 0] = 100.0
  assert float(next_token_nll(jnp.asarray(changed), jnp.asarray(targets), jnp.asarray(mask))[0]) == pytest.approx(
      float(nll), rel=1e-6)


@pytest.fixture(scope="module")
def packed():
  rng = np.random.default_rng(1)
  lengths = rng.integers(4, 30, size=30)
  starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  split = Split(rng.integers(1, 128, size=starts[-1]).astype(np.uint16), starts, 24)
  return split.rows(np.arange(8))


def _grads(cfg, rows, accum, remat="none"):
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  params = nnx.state(model)
  step_graphdef = nnx.split(apply_remat(model, remat))[0]
  batch = {k: jnp.asarray(v.reshape(accum, -1, v.shape[-1])) for k, v in rows.items()}
  fn = lambda p, b: loss_and_grads(step_graphdef, p, b)
  loss, grads, _ = jax.jit(fn)(params, batch)
  return float(loss), grads, str(jax.make_jaxpr(fn)(params, batch))


@pytest.fixture(scope="module")
def reference(packed):
  return _grads(CFG, packed, accum=1)


def test_accumulation_and_remat_give_the_same_gradient(packed, reference):
  loss1, g1, jaxpr1 = reference
  loss4, g4, jaxpr4 = _grads(CFG, packed, accum=4, remat="full")
  assert "remat" in jaxpr4 and "remat" not in jaxpr1
  assert loss4 == pytest.approx(loss1, rel=1e-6)
  # the eval step (forward only) through the same rematerialised layers gives the same mean loss
  model = Transformer(CFG, rngs=nnx.Rngs(0))
  params, graphdef = nnx.state(model), nnx.split(apply_remat(model, "full"))[0]
  batch = {k: jnp.asarray(v.reshape(2, -1, v.shape[-1])) for k, v in packed.items()}
  nll, count = jax.jit(lambda p, b: eval_step(graphdef, p, b))(params, batch)
  assert float(nll / count) == pytest.approx(loss1, rel=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=0)


def test_bf16_compute_keeps_float32_master_weights(packed, reference):
  loss, grads, _ = _grads(CFG.replace(dtype="bfloat16"), packed, accum=1, remat="dots")
  ref, ref_grads, _ = reference
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  assert loss == pytest.approx(ref, rel=2e-2)  # bf16 activations: close, not equal
  cos = [float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
         for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads))]
  assert min(cos) > 0.97


def test_schedule_warmup_then_cosine():
  schedule = learning_rate_schedule(TrainConfig(steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1))
  assert float(schedule(0)) == pytest.approx(0.1)
  assert float(schedule(9)) == pytest.approx(1.0)
  assert float(schedule(100)) == pytest.approx(0.1)
  assert float(schedule(55)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-3)


def test_flops_and_assumed_peak_are_stated():
  per_token = train_flops_per_token(CFG, 64)
  d, hd = 32, 8
  matmul = 2 * (d * hd * (2 * 4 + 2 * 2) + 3 * d * 64) + d * 128
  assert per_token == 3 * (2 * matmul + 2 * 2 * 64 * 4 * hd * 2 / 2)
  peak, note = peak_flops_per_device()
  assert peak > 0 and "CPU" in note and "assumption" in note
  assert peak_flops_per_device(override=1e12)[0] == 1e12


def test_moe_flops_count_the_active_experts_only():
  """A Qwen2-MoE layer: router + top-k experts + shared expert and its gate; a sparse-step dense layer: its MLP."""
  moe = CFG.replace(model_type="qwen2_moe", num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
                    shared_expert_intermediate_size=24, decoder_sparse_step=2)
  d, hd = 32, 8
  attn = d * hd * (2 * 4 + 2 * 2)
  dense_mlp, moe_mlp = 3 * d * 64, d * 6 + 2 * 3 * d * 16 + 3 * d * 24 + d
  matmul = 2 * attn + dense_mlp + moe_mlp + d * 128  # layer 0 dense (sparse step 2), layer 1 MoE
  assert train_flops_per_token(moe, 64) == 3 * (2 * matmul + 2 * 2 * 64 * 4 * hd * 2 / 2)
