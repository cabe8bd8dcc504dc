"""The AutoGPTQ / GPTQModel tensor layout: our packing against an independent plain-numpy unpacker written from
the layout (bit by bit, one row at a time), the v1 zero - 1 offset, and packing round trips."""

import numpy as np
import pytest

from jaxinfer.quant import gptq_format as G
from jaxinfer.quant.methods import gptq as gptq_method
from jaxinfer.quant.weights import GroupQuantizedKernel


def unpack_reference(qweight, qzeros, scales, g_idx, bits, v1):
  """W [in, out] from the four tensors, following the layout literally: row i's code is bits (bits*(i % pack))
  and up of int32 word qweight[i // pack]; zero (g, o) likewise in qzeros[g, o // pack]; v1 stores zero - 1."""
  pack, mask = 32 // bits, (1 << bits) - 1
  rows, out = qweight.shape[0] * pack, qweight.shape[1]
  w = np.zeros((rows, out))
  for i in range(rows):
    for o in range(out):
      code = (int(qweight[i // pack, o]) & 0xFFFFFFFF) >> (bits * (i % pack)) & mask
      g = int(g_idx[i])
      zero = ((int(qzeros[g, o // pack]) & 0xFFFFFFFF) >> (bits * (o % pack)) & mask) + (1 if v1 else 0)
      w[i, o] = (code - zero) * float(scales[g, o])
  return w


def random_kernel(rng, bits, rows, out, group_size, act_order, zero_low=1):
  codes = rng.integers(0, 2 ** bits, size=(rows, out))
  groups = -(-rows // group_size)
  scales = rng.uniform(0.01, 0.1, size=(groups, out))
  zeros = rng.integers(zero_low, 2 ** bits, size=(groups, out)).astype(np.float64)
  perm = rng.permutation(rows) if act_order else None
  if perm is not None:
    codes, perm = gptq_method.canonical_order(codes, perm, group_size)
  return GroupQuantizedKernel(codes, scales, zeros, bits=bits, group_size=group_size, method="gptq", perm=perm)


@pytest.mark.parametrize("bits,act_order,fmt,group_size", [(4, False, "gptq", 16), (4, True, "gptq", 16),
                                                           (4, True, "gptq_v2", 16), (8, False, "gptq", 16),
                                                           (4, True, "gptq", 24)])  # 64 = 24 + 24 + 16
def test_packing_matches_independent_unpacker(bits, act_order, fmt, group_size):
  rng = np.random.default_rng(bits + 10 * act_order + group_size)
  kernel = random_kernel(rng, bits, rows=64, out=16, group_size=group_size, act_order=act_order)
  groups = -(-64 // group_size)
  t = G.to_tensors(kernel, fmt)
  assert t["qweight"].dtype == np.int32 and t["qweight"].shape == (64 * bits // 32, 16)
  assert t["qzeros"].dtype == np.int32 and t["qzeros"].shape == (groups, 16 * bits // 32)
  assert t["scales"].dtype == np.float16 and t["g_idx"].shape == (64,)
  want = np.asarray(kernel.dequantized(), np.float64)
  got = unpack_reference(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, v1=fmt == "gptq")
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  if act_order:
    assert not np.all(t["g_idx"] == np.arange(64) // group_size)  # groups are not contiguous rows
  back = G.from_tensors(t, rows=64, out=16, cfg=dict(bits=bits, group_size=group_size, sym=False, format=fmt), prefix="x",
                        axes=(None, None))
  np.testing.assert_array_equal(np.asarray(back.stored_codes()), np.asarray(kernel.stored_codes()))
  np.testing.assert_array_equal(np.asarray(back.dequantized()), np.asarray(kernel.dequantized()))


def test_v1_stores_zero_minus_one():
  rng = np.random.default_rng(0)
  kernel = random_kernel(rng, 4, rows=32, out=8, group_size=32, act_order=False)
  zeros = np.rint(np.asarray(kernel.zeros.get_value(), np.float64)).astype(np.int64)
  for fmt, offset in (("gptq", 1), ("gptq_v2", 0)):
    stored = G.unpack_along(G.to_tensors(kernel, fmt)["qzeros"], 4, 1)
    np.testing.assert_array_equal(stored + offset, zeros)
  # read as v2, a v1 file's zero points would all be one too small
  t = G.to_tensors(kernel, "gptq")
  wrong = G.from_tensors(t, rows=32, out=8, cfg=dict(bits=4, group_size=32, sym=False, format="gptq_v2"),
                         prefix="x", axes=(None, None))
  np.testing.assert_array_equal(np.asarray(wrong.zeros.get_value(), np.float64), zeros - 1)


def test_zero_point_zero_forces_v2():
  rng = np.random.default_rng(1)
  kernel = random_kernel(rng, 4, rows=32, out=8, group_size=16, act_order=False, zero_low=0)
  kernel.zeros.set_value(kernel.zeros.get_value().at[0, 0].set(0))
  assert G.choose_format([kernel]) == "gptq_v2"


def test_pack_along_round_trip_and_errors():
  rng = np.random.default_rng(2)
  v = rng.integers(0, 16, size=(16, 24))
  np.testing.assert_array_equal(G.unpack_along(G.pack_along(v, 4, 0), 4, 0), v)
  np.testing.assert_array_equal(G.unpack_along(G.pack_along(v, 4, 1), 4, 1), v)
  with pytest.raises(G.GPTQFormatError, match="not a multiple of 8"):
    G.pack_along(v[:12], 4, 0)


@pytest.mark.parametrize("qc,match", [
    ({"quant_method": "awq", "bits": 4}, "quant_method 'awq' is not supported"),
    ({"quant_method": "gptq", "bits": 3}, "bits=3 is not supported"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size=0"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
])
def test_quantization_config_errors(qc, match):
  with pytest.raises(G.GPTQFormatError, match=match):
    G.read_quantization_config(qc, "config.json")


def test_tensor_shape_errors_name_tensor_and_settings():
  rng = np.random.default_rng(3)
  t = G.to_tensors(random_kernel(rng, 4, rows=64, out=16, group_size=16, act_order=False), "gptq")
  cfg = dict(bits=4, group_size=32, sym=False, format="gptq")  # the file has 16-row groups
  with pytest.raises(G.GPTQFormatError, match=r"x\.qzeros has shape \(4, 2\), but bits=4, group_size=32"):
    G.from_tensors(t, rows=64, out=16, cfg=cfg, prefix="x", axes=(None, None))
  with pytest.raises(G.GPTQFormatError, match=r"x\.qweight has shape \(8, 16\), but bits=8"):
    G.from_tensors(t, rows=64, out=16, cfg=dict(cfg, bits=8, group_size=16), prefix="x", axes=(None, None))
  bad = dict(t, g_idx=np.zeros(64, np.int32))
  with pytest.raises(G.GPTQFormatError, match="g_idx: every group must hold group_size=16 rows"):
    G.from_tensors(bad, rows=64, out=16, cfg=dict(cfg, group_size=16), prefix="x", axes=(None, None))
