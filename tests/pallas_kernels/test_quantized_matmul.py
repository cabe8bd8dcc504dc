"""quantized_matmul (dequantizing matmul): every implementation (Pallas ones in interpret mode) against the
float32 reference, and the reference against a plain numpy dequantization.

Fresh random codes, scales and zero points (never zeros), int8 and nibble-packed int4, every group size the
quantizers use here (16, 32, 64, 128 and one group per channel), odd shapes (M = 3 or 5 rows, N = 50 or 130
columns, K = 75 or 96 in one group), float32 and bfloat16 activations, leading batch dims.

Tolerances (max abs error <= tol * max(1, max |expected|)):
  float32 2e-5: all compute in float32; only the summation order differs (per-group partial sums, K tiles).
  bfloat16 2e-2: x is bf16 on both sides, but the kernels round the dequantized weight tile to bf16 for the
    MXU / tensor cores (relative 2^-9 per element) and the output to bf16.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.quantized_matmul import api, gpu, pack_int4, quantized_matmul, tpu, xla
from testlib import assert_close, assert_forced_implementations

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
IMPLS = {
    "xla": xla.quantized_matmul,
    "pallas_gpu": functools.partial(gpu.quantized_matmul, interpret=True, block_k=16, block_n=32),
    "pallas_tpu": functools.partial(tpu.quantized_matmul, interpret=True, block_k=128),
}


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  bits: int
  group_size: int
  m: int
  k: int
  n: int
  dtype: type = jnp.float32


CASES = [
    Case("int4_g16_odd_mn", 4, 16, 3, 96, 50),
    Case("int4_g64_bf16_odd_n", 4, 64, 5, 128, 130, jnp.bfloat16),
    Case("int4_g128_bf16", 4, 128, 2, 256, 128, jnp.bfloat16),
    Case("int4_per_channel_odd_k", 4, 96, 3, 96, 40),
    Case("int8_g32", 8, 32, 4, 128, 96),
    Case("int8_per_channel_odd_k_bf16", 8, 75, 5, 75, 50, jnp.bfloat16),
]


def make_inputs(case: Case, seed: int = 0):
  """(x, w, scales, zeros) and the unpacked codes (numpy)."""
  rng = np.random.default_rng(seed)
  groups = case.k // case.group_size
  codes = rng.integers(0, 2 ** case.bits, size=(case.k, case.n)).astype(np.uint8)
  w = pack_int4(codes) if case.bits == 4 else jnp.asarray(codes)
  scales = jnp.asarray(rng.uniform(0.005, 0.05, size=(groups, case.n)), jnp.float16)
  zeros = jnp.asarray(rng.integers(1, 2 ** case.bits, size=(groups, case.n)), jnp.float16)
  x = jnp.asarray(rng.standard_normal((case.m, case.k)), case.dtype)
  return (x, w, scales, zeros), codes


def numpy_dequantize(codes, scales, zeros, group_size):
  g = np.arange(codes.shape[0]) // group_size
  return (codes.astype(np.float64) - np.asarray(zeros, np.float64)[g]) * np.asarray(scales, np.float64)[g]


@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=lambda c: c.name)
def test_reference_matches_numpy(case):
  (x, w, s, z), codes = make_inputs(case)
  y = api.quantized_matmul(x, w, s, z, bits=case.bits, group_size=case.group_size, implementation="reference")
  want = np.asarray(x, np.float64) @ numpy_dequantize(codes, s, z, case.group_size)
  assert y.dtype == case.dtype and y.shape == (case.m, case.n)
  assert_close(y, want, TOL[case.dtype] if case.dtype == jnp.bfloat16 else 1e-5, "reference")


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference(case, impl):
  args, _ = make_inputs(case, seed=1)
  ref = api.quantized_matmul(*args, bits=case.bits, group_size=case.group_size, implementation="reference")
  out = IMPLS[impl](*args, bits=case.bits, group_size=case.group_size)
  assert out.dtype == case.dtype and out.shape == ref.shape
  assert_close(out, ref, TOL[case.dtype], f"{impl} {case.name}")


@pytest.mark.parametrize("impl", ["pallas_tpu"])
def test_public_api_interpret_with_batch_dims(impl):
  case = CASES[0]
  (x, w, s, z), _ = make_inputs(case, seed=2)
  x3 = jnp.stack([x, -x])  # [2, m, k]
  out = api.quantized_matmul(x3, w, s, z, bits=4, group_size=16, implementation=impl, interpret=True)
  ref = api.quantized_matmul(x3, w, s, z, bits=4, group_size=16, implementation="reference")
  assert out.shape == (2, case.m, case.n)
  assert_close(out, ref, 2e-5, impl)


def test_default_is_xla_on_cpu_and_logged_once(caplog):
  args, _ = make_inputs(CASES[4])
  api.OP.forget_choices()
  with caplog.at_level(logging.INFO, logger="pallas_kernels.op"):
    out = jax.jit(functools.partial(quantized_matmul, bits=8, group_size=32))(*args)
    quantized_matmul(*args, bits=8, group_size=32)
  assert sum("'xla'" in r.getMessage() and "quantized_matmul" in r.getMessage() for r in caplog.records) == 1
  assert_close(out, api.quantized_matmul(*args, bits=8, group_size=32, implementation="reference"), 2e-5, "out")


def test_unavailable_implementations_raise():
  args, _ = make_inputs(CASES[0])
  assert_forced_implementations(lambda impl: quantized_matmul(*args, bits=4, group_size=16, implementation=impl), api)


@pytest.mark.parametrize("platform,impl,marker", [("cuda", gpu, "triton"), ("tpu", tpu, "tpu_custom_call")])
def test_pallas_lowers_for_hardware(platform, impl, marker):
  """Lowering for the real backend at a decode shape (bf16, batch 8, 4096 -> 4096, int4 g128)."""
  x = jnp.ones((8, 4096), jnp.bfloat16)
  w = jnp.ones((2048, 4096), jnp.uint8)
  s = jnp.ones((32, 4096), jnp.float16)
  fn = jax.jit(functools.partial(impl.quantized_matmul, bits=4, group_size=128))
  assert marker in fn.trace(x, w, s, s).lower(lowering_platforms=(platform,)).as_text()


_X = jnp.ones((2, 64))
_W4 = jnp.ones((32, 8), jnp.uint8)
_S = jnp.ones((2, 8), jnp.float16)


@pytest.mark.parametrize("args,kw,match", [
    ((_X, _W4, _S, _S), dict(bits=3), "bits must be one of"),
    ((_X, _W4, _S, _S), dict(group_size=48), "not a multiple of group_size=48"),
    ((_X[:, :62], _W4[:31], _S[:, :], _S), dict(group_size=31), "group_size=31 must be even"),
    ((_X, _W4.astype(jnp.int8), _S, _S), {}, "uint8"),
    ((_X, _W4[:16], _S, _S), {}, "w has 16 rows"),
    ((_X, _W4, _S[:1], _S), {}, "scales must have shape"),
    ((_X, _W4, _S, _S[:, :4]), {}, "zeros must have shape"),
    ((_X.astype(jnp.int32), _W4, _S, _S), {}, "x must be a floating"),
], ids=["bits", "group", "odd_group_int4", "dtype", "rows", "scales", "zeros", "x_int"])
def test_bad_inputs(args, kw, match):
  kw = dict(dict(bits=4, group_size=32), **kw)
  with pytest.raises(ValueError, match=match):
    quantized_matmul(*args, **kw)
