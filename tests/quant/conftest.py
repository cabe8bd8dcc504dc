"""Shared fixtures of the quantization tests: one small float model, its calibration batches, a jitted forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from testlib import tiny_model_config


def logits(model, tokens):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, jnp.asarray(tokens))


@pytest.fixture(scope="session")
def float_model():
  import jaxinfer

  return jaxinfer.init_model(tiny_model_config(num_layers=1, hidden_size=64, intermediate_size=128,
                                               initializer_range=0.05), seed=3)


@pytest.fixture(scope="session")
def tokens():
  return np.random.default_rng(7).integers(0, 128, size=(4, 24)).astype(np.int32)
