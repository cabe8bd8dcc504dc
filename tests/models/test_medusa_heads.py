"""Medusa heads: an untrained head is the base lm_head (zero residual blocks + copied projection); the file
round trip is exact and in the Medusa project's torch layout; bad files name what is wrong."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from jaxinfer.models.medusa import (CONFIG_FILE, WEIGHTS_FILE, MedusaConfig, MedusaHeads, load_medusa_heads,
                                    save_medusa_heads)
from jaxinfer.models.transformer import Transformer
from tests.testlib import randn, tiny_model_config


def _model():
  cfg = tiny_model_config()
  return Transformer(cfg, rngs=nnx.Rngs(0))


def test_fresh_heads_equal_the_base_lm_head_and_training_moves_them():
  model = _model()
  heads = MedusaHeads(MedusaConfig.for_model(model.config, num_heads=3, num_layers=2), rngs=nnx.Rngs(1))
  heads.init_from_base(model)
  hidden = randn((5, model.config.hidden_size), "medusa-hidden")
  out = heads(hidden)
  assert out.shape == (5, 3, model.config.vocab_size)
  base = model.logits(hidden)
  for k in range(3):
    np.testing.assert_allclose(out[:, k], base, rtol=1e-5, atol=1e-5)
  heads.res_kernel[...] = randn(heads.res_kernel.shape, "medusa-res") * 0.1
  moved = heads(hidden)
  assert float(jnp.abs(moved - out).max()) > 1e-3  # the residual blocks are in the path


def test_file_round_trip_uses_the_medusa_layout(tmp_path):
  model = _model()
  cfg = MedusaConfig.for_model(model.config, num_heads=2, num_layers=1)
  heads = MedusaHeads(cfg, rngs=nnx.Rngs(2))
  heads.res_kernel[...] = randn(heads.res_kernel.shape, "medusa-rk")
  heads.res_bias[...] = randn(heads.res_bias.shape, "medusa-rb")
  save_medusa_heads(heads, tmp_path)
  with safe_open(str(tmp_path / WEIGHTS_FILE), framework="numpy") as f:
    w = f.get_tensor("medusa_head.1.0.linear.weight")
    np.testing.assert_array_equal(w, np.asarray(heads.res_kernel[...])[1, 0].T)  # torch [out, in]
    assert f.get_tensor("medusa_head.0.1.weight").shape == (cfg.vocab_size, cfg.hidden_size)
  back = load_medusa_heads(tmp_path, model.config)
  hidden = randn((4, cfg.hidden_size), "medusa-h2")
  np.testing.assert_array_equal(np.asarray(back(hidden)), np.asarray(heads(hidden)))

  other = tiny_model_config(vocab_size=model.config.vocab_size + 8)
  with pytest.raises(ValueError, match="vocab_size"):
    load_medusa_heads(tmp_path, other)
  meta = json.loads((tmp_path / CONFIG_FILE).read_text())
  meta["medusa_num_heads"] = 3
  (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="medusa_head.2.0.linear.weight"):
    load_medusa_heads(tmp_path)
  with pytest.raises(FileNotFoundError, match="experiments/medusa.py"):
    load_medusa_heads(tmp_path / "nowhere")
