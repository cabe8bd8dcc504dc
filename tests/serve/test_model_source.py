"""What `jaxinfer serve` serves without a checkpoint: results/quickstart/hf (against the cwd) when it exists,
with jaxinfer's simple chat template, else a random byte-level model; a checkpoint's own template wins."""

import json

import pytest

from jaxinfer.serve import model_source
from jaxinfer.serve.chat_template import SIMPLE_TEMPLATE
from jaxinfer.serve.config import ServeConfig


def test_quickstart_export_then_random(tmp_path, monkeypatch, served):
  from jaxinfer.checkpoint.hf import save_hf

  monkeypatch.chdir(tmp_path)
  first = model_source.load_served_model(ServeConfig(random_max_len=64))
  assert first.name == "random-bytes" and "no checkpoint" in first.describe
  export = tmp_path / "results" / "quickstart" / "hf"
  save_hf(served.model, export)
  (export.parent / "resolved_config.json").write_text(json.dumps({"name": "quickstart", "train": {}}))
  chosen = model_source.load_served_model(ServeConfig())
  assert chosen.name == "quickstart" and chosen.describe.startswith("the quickstart export")
  assert chosen.chat_template == SIMPLE_TEMPLATE
  (export / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
  assert model_source.load_served_model(ServeConfig()).chat_template == "{{ messages[0]['content'] }}"


def test_bad_checkpoint_is_named(tmp_path):
  from jaxinfer.config import ConfigError

  with pytest.raises(ConfigError, match="serve.checkpoint: .* is not a folder"):
    model_source.load_served_model(ServeConfig(checkpoint=str(tmp_path / "missing")))
  with pytest.raises(ConfigError, match="no config.json"):
    model_source.load_served_model(ServeConfig(checkpoint=str(tmp_path)))
  with pytest.raises(ConfigError, match="serve.port"):
    ServeConfig(port=-1)
