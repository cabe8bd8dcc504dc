"""GPTQ checkpoints through save_hf / load_hf: what save_hf writes (names, dtypes, quantization_config), that it
reloads with identical logits, and clear errors for checkpoints that disagree with their config."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxinfer
from jaxinfer.config import ConfigError
from jaxinfer.quant.weights import GroupQuantizedKernel

from quant.conftest import logits


@pytest.fixture(scope="module")
def gptq_dir(float_model, tokens, tmp_path_factory):
  q = jaxinfer.quantize(float_model, method="gptq", bits=4, group_size=32, act_order=True, calibration=tokens)
  path = tmp_path_factory.mktemp("gptq")
  jaxinfer.save_hf(q, path)
  return q, path


def test_layout_written(gptq_dir):
  _, path = gptq_dir
  qc = json.loads((path / "config.json").read_text())["quantization_config"]
  assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32
  assert qc["desc_act"] is True and qc["sym"] is False and qc["checkpoint_format"] in ("gptq", "gptq_v2")
  t = load_file(path / "model.safetensors")
  prefix = "model.layers.0.self_attn.q_proj"
  assert t[f"{prefix}.qweight"].dtype == np.int32 and t[f"{prefix}.qweight"].shape == (64 // 8, 64)
  assert t[f"{prefix}.qzeros"].shape == (2, 64 // 8) and t[f"{prefix}.scales"].dtype == np.float16
  assert t[f"{prefix}.g_idx"].shape == (64,) and f"{prefix}.weight" not in t
  assert "lm_head.weight" in t and "model.embed_tokens.weight" in t  # float by default


def test_reload_gives_identical_logits(gptq_dir, tokens):
  q, path = gptq_dir
  again = jaxinfer.load_hf(path)
  assert isinstance(again.layers[0].mlp.down_proj.kernel, GroupQuantizedKernel)
  assert again.layers[0].mlp.down_proj.kernel.perm is not None  # act-order kept
  np.testing.assert_array_equal(np.asarray(logits(again, tokens)), np.asarray(logits(q, tokens)))


def _rewrite(src, dst, config_change=None, tensor_change=None):
  dst.mkdir()
  hf = json.loads((src / "config.json").read_text())
  if config_change:
    config_change(hf)
  (dst / "config.json").write_text(json.dumps(hf))
  t = load_file(src / "model.safetensors")
  if tensor_change:
    tensor_change(t)
  save_file(t, dst / "model.safetensors")
  return dst


@pytest.mark.parametrize("config_change,tensor_change,match", [
    (lambda hf: hf["quantization_config"].update(quant_method="awq"), None, "quant_method 'awq' is not supported"),
    (lambda hf: hf["quantization_config"].update(bits=8), None, r"down_proj\.qweight has shape \(16, 64\), but bits=8"),
    (lambda hf: hf["quantization_config"].update(group_size=16), None, r"down_proj\.qzeros has shape \(4, 8\), but bits=4, group_size=16"),
    (None, lambda t: t.update({"model.layers.0.mlp.up_proj.qweight": t["model.layers.0.mlp.up_proj.qweight"][:4]}),
     r"mlp\.up_proj\.qweight has shape \(4, 128\)"),
    (None, lambda t: t.pop("model.layers.0.mlp.up_proj.g_idx"), r"missing from the checkpoint: .*up_proj\.g_idx"),
], ids=["method", "bits", "group_size", "shape", "missing"])
def test_bad_checkpoints_name_the_problem(gptq_dir, tmp_path, config_change, tensor_change, match):
  path = _rewrite(gptq_dir[1], tmp_path / "bad", config_change, tensor_change)
  with pytest.raises(jaxinfer.CheckpointError, match=match):
    jaxinfer.load_hf(path)


def test_save_refuses_what_gptq_cannot_hold(float_model, tmp_path):
  with pytest.raises(ConfigError, match="llm_int8 weight; only group-wise"):
    jaxinfer.save_hf(jaxinfer.quantize(float_model, method="llm_int8"), tmp_path / "a")
  with pytest.raises(ConfigError, match="bits=3"):
    jaxinfer.save_hf(jaxinfer.quantize(float_model, method="rtn", bits=3, group_size=32), tmp_path / "b")
