"""Serve test set-up: one server for the whole directory, on a tiny random byte-level model whose engine
compiles a single step program (every step padded to 64 tokens x 16 sequences), on a free loopback port."""

import pytest

TEST_ENGINE = dict(max_batch_size=16, max_step_tokens=64, page_size=8, min_seq_bucket=16, min_token_bucket=64,
                   max_queue=1024)


@pytest.fixture(scope="session")
def served():
  from jaxinfer.serve import model_source
  from jaxinfer.serve.config import ServeConfig

  return model_source.random_model(ServeConfig(random_max_len=256), seed=3)


@pytest.fixture(scope="session")
def serving(served):
  from jaxinfer.engine import EngineConfig
  from jaxinfer.serve import server

  s = server.create(served, EngineConfig(**TEST_ENGINE), max_queue=256)
  yield s
  s.bridge.stop()


@pytest.fixture(scope="session")
def server_url(serving):
  from jaxinfer.serve.server import BackgroundServer

  with BackgroundServer(serving) as background:
    yield background.url


@pytest.fixture(scope="session")
def client(server_url):
  import openai

  return openai.OpenAI(base_url=server_url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model_name(served):
  return served.name
