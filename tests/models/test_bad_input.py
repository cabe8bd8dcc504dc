"""Bad input raises an error that names the problem, and nothing on disk changes."""

import json
import os

import numpy as np
import pytest

import jaxinfer
from jaxinfer.checkpoint.hf import CheckpointError

CFG = jaxinfer.ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                           num_kv_heads=2, max_position_embeddings=64)


def snapshot(path):
  return {p: (os.path.getsize(os.path.join(path, p)), os.path.getmtime(os.path.join(path, p)))
          for p in sorted(os.listdir(path))}


@pytest.fixture(scope="module")
def model():
  return jaxinfer.init_model(CFG, seed=1)


@pytest.fixture
def checkpoint(model, tmp_path):
  return jaxinfer.save_hf(model, tmp_path / "ckpt")


def test_missing_directory(tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    jaxinfer.load_hf(tmp_path / "nowhere")


def test_missing_weights_file(checkpoint):
  os.remove(checkpoint / "model.safetensors")
  before = snapshot(checkpoint)
  with pytest.raises(CheckpointError, match="model.safetensors"):
    jaxinfer.load_hf(checkpoint)
  assert snapshot(checkpoint) == before


def test_missing_config(checkpoint):
  os.remove(checkpoint / "config.json")
  with pytest.raises(CheckpointError, match="config.json"):
    jaxinfer.load_hf(checkpoint)


def test_corrupt_weights_file(checkpoint):
  data = (checkpoint / "model.safetensors").read_bytes()
  (checkpoint / "model.safetensors").write_bytes(data[:len(data) // 3])
  before = snapshot(checkpoint)
  with pytest.raises(CheckpointError, match="corrupt"):
    jaxinfer.load_hf(checkpoint)
  assert snapshot(checkpoint) == before


def test_corrupt_header(checkpoint):
  (checkpoint / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
  with pytest.raises(CheckpointError, match="model.safetensors"):
    jaxinfer.load_hf(checkpoint)


def test_unsupported_model_type(checkpoint):
  config = json.loads((checkpoint / "config.json").read_text())
  config["model_type"] = "gpt_neox"
  (checkpoint / "config.json").write_text(json.dumps(config))
  with pytest.raises(jaxinfer.ConfigError, match=r"gpt_neox.*llama, mistral, qwen2, qwen3"):
    jaxinfer.load_hf(checkpoint)


def test_shape_disagrees_with_config(checkpoint):
  config = json.loads((checkpoint / "config.json").read_text())
  config["intermediate_size"] = 64
  (checkpoint / "config.json").write_text(json.dumps(config))
  before = snapshot(checkpoint)
  with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight has shape"):
    jaxinfer.load_hf(checkpoint)
  assert snapshot(checkpoint) == before


def test_missing_tensor(checkpoint):
  config = json.loads((checkpoint / "config.json").read_text())
  config["num_hidden_layers"] = 3
  (checkpoint / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r"missing from the checkpoint: .*layers\.2"):
    jaxinfer.load_hf(checkpoint)


def test_pytorch_bin_is_refused(tmp_path):
  path = tmp_path / "bin_ckpt"
  path.mkdir()
  (path / "config.json").write_text(json.dumps(CFG.to_hf()))
  (path / "pytorch_model.bin").write_bytes(b"pickle")
  with pytest.raises(CheckpointError, match="pickles"):
    jaxinfer.load_hf(path)


def test_failed_save_leaves_previous_checkpoint(model, checkpoint, monkeypatch):
  before = {name: (checkpoint / name).read_bytes() for name in os.listdir(checkpoint)}
  import safetensors.flax

  def explode(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(safetensors.flax, "save_file", explode)
  with pytest.raises(OSError, match="disk full"):
    jaxinfer.save_hf(model, checkpoint)
  assert {name: (checkpoint / name).read_bytes() for name in os.listdir(checkpoint)} == before


@pytest.mark.parametrize("prompts, max_new, match", [
    ([[1, 2, 97]], 4, r"token id 97 is outside the vocabulary \[0, 97\)"),
    ([[1, -3]], 4, r"token id -3 is outside"),
    ([[1, 2], []], 4, "prompt 1 is empty"),
    ([], 4, "non-empty list"),
    ([[1] * 60], 5, r"60 \+ max_new_tokens 5 = 65 exceeds the model's max_position_embeddings 64"),
    ([[1, 2]], 0, "max_new_tokens must be a positive integer"),
])
def test_generate_rejects_bad_input(model, prompts, max_new, match):
  with pytest.raises(ValueError, match=match):
    jaxinfer.generate(model, prompts, max_new)


def test_bad_model_config_names_field():
  with pytest.raises(jaxinfer.ConfigError, match="model.num_kv_heads"):
    CFG.replace(num_kv_heads=3)
  with pytest.raises(jaxinfer.ConfigError, match="model.rope_type"):
    CFG.replace(rope_type="yarn")


def test_sampling_params_validated():
  with pytest.raises(ValueError, match="top_p"):
    jaxinfer.SamplingParams(top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    jaxinfer.SamplingParams(temperature=-1.0)
