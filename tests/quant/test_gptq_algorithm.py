"""GPTQ on one layer: with a random (correlated) input distribution, its output error ||W X - Q X|| on
held-out inputs is below round-to-nearest's at the same bits and group size, with and without act-order;
and the error it is built to reduce, tr((W - Q) H (W - Q)^T), is lower on the calibration Hessian too."""

import numpy as np
import pytest

from jaxinfer.quant import grid
from jaxinfer.quant.methods.gptq import gptq, inverse_hessian_factor


def correlated_inputs(rng, dim, n, mixing):
  """Inputs with a random covariance (features mixed, a few large ones): x = A z, z standard normal."""
  return mixing @ rng.standard_normal((dim, n))


def dequantized(codes, scales, zeros, perm, group_size):
  g = np.arange(codes.shape[0]) // group_size
  w = (codes - zeros[g]) * scales[g]  # [in (quantization order), out]
  out = np.empty_like(w)
  out[perm if perm is not None else np.arange(w.shape[0])] = w
  return out.T  # [out, in]


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, False), (4, 32, True), (3, 64, False),
                                                      (3, 64, True), (4, 128, False)])
def test_gptq_beats_rtn_on_held_out_inputs(bits, group_size, act_order):
  rng = np.random.default_rng(bits * 100 + group_size + act_order)
  dim, out = 128, 48
  mixing = rng.standard_normal((dim, dim)) * rng.uniform(0.2, 2.0, size=(1, dim))
  x_cal, x_test = correlated_inputs(rng, dim, 512, mixing), correlated_inputs(rng, dim, 512, mixing)
  w = rng.standard_normal((out, dim))
  hessian = 2 * x_cal @ x_cal.T / x_cal.shape[1]
  codes, scales, zeros, perm = gptq(w, hessian, bits=bits, group_size=group_size, sym=False, act_order=act_order,
                                    damp=0.01, block_size=32, scale_dtype="float16")
  assert codes.min() >= 0 and codes.max() < 2 ** bits and scales.shape == (dim // group_size, out)
  assert (perm is not None) == act_order
  q_gptq = dequantized(codes, scales, zeros, perm, group_size)
  rc, rs, rz = grid.round_to_nearest(w.T, bits, group_size, False, "float16")
  q_rtn = dequantized(rc, rs, rz, None, group_size)
  err = lambda q, x: np.linalg.norm(w @ x - q @ x)  # noqa: E731
  assert err(q_gptq, x_test) < 0.8 * err(q_rtn, x_test)
  proxy = lambda q: np.trace((w - q) @ hessian @ (w - q).T)  # noqa: E731
  assert proxy(q_gptq) < proxy(q_rtn)


def test_inverse_hessian_factor():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((16, 40))
  h = a @ a.T
  u = inverse_hessian_factor(h, 0.01)
  assert np.allclose(np.triu(u), u)
  np.testing.assert_allclose(u.T @ u, np.linalg.inv(h + 0.01 * np.mean(np.diag(h)) * np.eye(16)), rtol=1e-8,
                             atol=1e-10)


def test_dead_inputs_and_lazy_blocks_agree():
  """An input that never fires gets weight 0; lazy batch updates give the same result for any block size."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((64, 200))
  x[5] = 0.0
  h = 2 * x @ x.T / 200
  w = rng.standard_normal((8, 64))
  a = gptq(w, h, bits=4, group_size=16, sym=True, act_order=False, damp=0.01, block_size=64)
  b = gptq(w, h, bits=4, group_size=16, sym=True, act_order=False, damp=0.01, block_size=16)
  np.testing.assert_array_equal(a[0], b[0])
  q = dequantized(a[0], a[1], a[2], None, 16)
  assert np.all(q[:, 5] == 0.0)
