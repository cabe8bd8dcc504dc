"""Engine test set-up: the tiny model fixture (testlib is on pytest's pythonpath, see pyproject.toml)."""

import pytest
from testlib import tiny_model_config

import jaxinfer


@pytest.fixture(scope="session")
def model():
  return jaxinfer.init_model(tiny_model_config(), seed=7)
