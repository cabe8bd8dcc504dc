"""jaxinfer.quantize: a new model (the float one unchanged), layers chosen by the rules, every method through the
same Linear seam, LLM.int8()'s outlier decomposition against numpy, and errors that name the input."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxinfer
from jaxinfer.config import ConfigError
from jaxinfer.quant.api import selected_linears, weight_bytes
from jaxinfer.quant.weights import GroupQuantizedKernel, OutlierInt8Kernel

from quant.conftest import logits

PROJECTIONS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"}


def kernels(model):
  return {p: m.kernel for p, m in nnx.iter_modules(model) if hasattr(m, "kernel")}


def rel_error(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("method,kw,tol", [("int8", {}, 0.01), ("llm_int8", {}, 0.03), ("rtn", dict(group_size=32), 0.2),
                                           ("gptq", dict(group_size=32, act_order=True), 0.1)])
def test_methods_leave_float_model_and_stay_close(float_model, tokens, method, kw, tol):
  before = {p: np.asarray(k.get_value()) for p, k in kernels(float_model).items()}
  ref = logits(float_model, tokens)
  q = jaxinfer.quantize(float_model, method=method, calibration=tokens, **kw)
  assert q is not float_model
  after = kernels(float_model)
  assert all(isinstance(k, nnx.Param) and np.array_equal(np.asarray(k.get_value()), before[p])
             for p, k in after.items())
  qk = {".".join(map(str, p[1:])): k for p, k in kernels(q).items() if p[0] == "layers"}
  assert set(qk) == {f"0.{name}" for name in PROJECTIONS}
  kind = OutlierInt8Kernel if method == "llm_int8" else GroupQuantizedKernel
  assert all(isinstance(k, kind) and k.method == method for k in qk.values())
  assert isinstance(q.lm_head.kernel, nnx.Param)  # embedding and lm_head stay float by default
  out = logits(q, tokens)
  assert 0 < rel_error(out, ref) < tol
  assert weight_bytes(q)["linear"] < weight_bytes(float_model)["linear"]


def test_rtn_codes_are_nearest(float_model):
  q = jaxinfer.quantize(float_model, method="rtn", bits=4, group_size=16)
  k = q.layers[0].mlp.up_proj.kernel
  w = float_model.layers[0].mlp.up_proj.kernel.get_value()
  step = np.repeat(np.asarray(k.scales.get_value(), np.float32), 16, axis=0)
  err = np.abs(np.asarray(k.dequantized()) - np.asarray(w))
  codes = np.asarray(k.stored_codes())
  inside = (codes > 0) & (codes < 15)  # not clipped: the nearest grid point
  assert np.all(err[inside] <= 0.5 * step[inside] + 1e-6) and np.all(err <= step + 1e-6)
  assert inside.mean() > 0.75 and k.codes.get_value().shape == (w.shape[0] // 2, w.shape[1])


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_short_last_group(float_model, tokens, method):
  """group_size 48 does not divide 64 or 128 input rows: the last group is shorter (GPTQ's g_idx = row // 48)."""
  q = jaxinfer.quantize(float_model, method=method, group_size=48, act_order=method == "gptq", calibration=tokens)
  k = q.layers[0].mlp.down_proj.kernel
  assert k.scales.get_value().shape == (3, 64) and k.stored_codes().shape == (128, 64)
  w = np.asarray(float_model.layers[0].mlp.down_proj.kernel.get_value())
  assert np.abs(np.asarray(k.dequantized()) - w).max() < 0.25 * np.abs(w).max()
  x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 128)), jnp.float32)  # the padded matmul
  np.testing.assert_allclose(np.asarray(k.matmul(x, jnp.float32)), np.asarray(x @ k.dequantized()), rtol=2e-5,
                             atol=2e-5)


def test_rules_choose_layers(float_model):
  rules = ("!.*mlp.*", r"layers\.\d+\.self_attn\..*", "lm_head")
  q = jaxinfer.quantize(float_model, method="int8", rules=rules)
  chosen = {p for p, m in nnx.iter_modules(q) if hasattr(m, "kernel") and not isinstance(m.kernel, nnx.Variable)}
  assert {".".join(map(str, p)) for p in chosen} == {"layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj",
                                                     "layers.0.self_attn.v_proj", "layers.0.self_attn.o_proj",
                                                     "lm_head"}
  assert [p for p, _ in selected_linears(float_model, ("!.*",))] == []


def test_llm_int8_outlier_decomposition_matches_numpy():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((32, 24)) * 0.1
  x = rng.standard_normal((5, 32))
  x[:, 7] *= 12.0  # an outlier feature dimension
  x[2, 19] = -9.0  # and one from a single token
  kernel = OutlierInt8Kernel(w, threshold=6.0)
  y = np.asarray(kernel.matmul(jnp.asarray(x, jnp.float32), jnp.float32), np.float64)
  codes = np.asarray(kernel.codes.get_value(), np.float64)
  scale = np.asarray(kernel.scale.get_value(), np.float64)
  outlier = np.abs(x).max(axis=0) > 6.0
  assert outlier.sum() == 2 and outlier[7] and outlier[19]
  x_in = np.where(outlier, 0.0, x)
  row = np.abs(x_in).max(axis=1, keepdims=True) / 127.0
  want = (np.round(x_in / row) @ codes) * row * scale + np.where(outlier, x, 0.0) @ (codes * scale)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  # and it is close to the float product, the outliers' large values included
  assert np.linalg.norm(y - x @ w) < 0.02 * np.linalg.norm(x @ w)


def test_generate_and_engine_accept_a_quantized_model(float_model, tokens):
  q = jaxinfer.quantize(float_model, method="gptq", calibration=[tokens[:2], tokens[2:]], group_size=32)
  prompts = [tokens[0, :5].tolist(), tokens[1, :3].tolist()]
  out = jaxinfer.generate(q, prompts, max_new_tokens=4)
  assert [len(o) for o in out] == [4, 4] and all(0 <= t < 128 for o in out for t in o)
  engine = jaxinfer.Engine(q, max_batch_size=2, page_size=8, max_model_len=64)
  ids = [engine.add_request(p, max_new_tokens=4) for p in prompts]
  got = {i: [] for i in ids}
  while engine.has_unfinished():
    for o in engine.step():
      got[o.request_id] += list(o.new_token_ids)
  assert [got[i] for i in ids] == out  # greedy: the engine and generate agree on the quantized model


@pytest.mark.parametrize("kw,error,match", [
    (dict(method="awq"), ConfigError, "quant.method: unknown method 'awq'"),
    (dict(method="gptq"), ValueError, "calibration: this method needs token-id batches"),
    (dict(method="int8", bits=4), ConfigError, "quant.bits: method 'int8' is 8-bit"),
    (dict(method="rtn", bits=9), ConfigError, "quant.bits: must be an integer in"),
    (dict(method="rtn", group_size=96), ValueError, "layers.0.*: group_size=96 exceeds the 64 input rows"),
    (dict(method="gptq", calibration=np.full((2, 4), 500)), ValueError, r"calibration\[0\]: token ids must lie in"),
    (dict(method="rtn", rules=("(",)), ConfigError, "quant.rules: '\\(' is not a valid regular expression"),
    (dict(method="rtn", rules=("nothing",)), ValueError, "quant.rules: no Linear layer matches"),
])
def test_errors_name_the_input(float_model, kw, error, match):
  with pytest.raises(error, match=match):
    jaxinfer.quantize(float_model, **kw)
