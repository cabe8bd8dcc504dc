"""Engine test set-up: the tiny model fixture; engine_testlib importable from the tests."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import jaxinfer  # noqa: E402
from engine_testlib import CFG  # noqa: E402


@pytest.fixture(scope="session")
def model():
  return jaxinfer.init_model(CFG, seed=7)
