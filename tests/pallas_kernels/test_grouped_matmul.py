"""grouped_matmul (megablox / ragged_dot): every implementation (Pallas ones in interpret mode) against the
float32 reference, forward and gradients, and the reference against a plain numpy loop over groups.

Fresh random inputs; group sizes with empty groups (first, middle and last), rows past sum(group_sizes)
(zeros), M not a multiple of the row tile, odd K and N, G not a power of two, float32 and bfloat16, tiles that
straddle several groups. Group sizes are traced (under jit), as in a model.

Tolerances (max abs error <= tol * max(1, max |expected|)):
  float32 2e-5: all compute in float32; only the summation order differs (K steps, row tiles in tgmm).
  bfloat16 2e-2: the reference rounds only its output to bf16; the kernels also round the backward's
    cotangent products (d_lhs, d_rhs are bf16 like lhs and rhs).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import api, gpu, reference, tpu, xla
from testlib import assert_close, assert_forced_implementations

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
IMPLS = {
    "xla": xla.grouped_matmul,
    "pallas_gpu": functools.partial(gpu.grouped_matmul, interpret=True, tm=16, tk=16, tn=16),
    "pallas_tpu": functools.partial(tpu.grouped_matmul, interpret=True, tm=16),
}
TGMM = {"pallas_gpu": functools.partial(gpu.tgmm, interpret=True, tm=16, tk=16, tn=16),
        "pallas_tpu": functools.partial(tpu.tgmm, interpret=True, tm=128)}


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  sizes: tuple
  m: int
  k: int
  n: int
  dtype: type = jnp.float32
  out_dtype: type | None = None


CASES = [
    # G=5; an empty middle group; rows 33..36 past the groups; 16-row tiles straddle groups; K, N odd
    Case("g5_empty_mid_tail_odd_kn", (9, 0, 14, 3, 7), 37, 24, 19),
    # G=3 in bf16 with float32 output; first and last groups empty, one group spans three tiles
    Case("g3_empty_ends_bf16_f32_out", (0, 40, 0), 45, 32, 20, jnp.bfloat16, jnp.float32),
    # bf16 out; six groups, one of 2 rows inside a tile (three groups share that tile). Under jit the values
    # are not checked: the -2 counts as 0 and the last group (9 rows) is cut at row M (ragged_dot's rule)
    Case("g6_bf16_cut_at_m", (5, 11, -2, 2, 13, 9), 34, 20, 24, jnp.bfloat16),
]
# the bf16-out case on the Triton kernel only (the interpret-mode time budget); both kernels share _common
PAIRS = [(c, i) for c in CASES[:2] for i in IMPLS] + [(CASES[2], "xla"), (CASES[2], "pallas_gpu")]


def make_inputs(case: Case, seed: int = 0):
  rng = np.random.default_rng(seed)
  g = len(case.sizes)
  lhs = jnp.asarray(rng.standard_normal((case.m, case.k)), case.dtype)
  rhs = jnp.asarray(rng.standard_normal((g, case.k, case.n)) / np.sqrt(case.k), case.dtype)
  ct = jnp.asarray(rng.standard_normal((case.m, case.n)), jnp.float32)
  return lhs, rhs, jnp.asarray(case.sizes, jnp.int32), ct


def value_and_grads(fn, lhs, rhs, sizes, ct):
  """(out, d lhs, d rhs) of sum(out * ct), jitted with group_sizes traced."""

  def loss(lhs, rhs, sizes):
    out = fn(lhs, rhs, sizes)
    return jnp.sum(out.astype(jnp.float32) * ct), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(lhs, rhs, sizes)
  return (out, *grads)


def numpy_grouped(lhs, rhs, sizes):
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  start = 0
  for g, size in enumerate(sizes):
    out[start:start + size] = lhs[start:start + size] @ rhs[g]
    start += size
  return out


@pytest.mark.parametrize("case", CASES[:1], ids=lambda c: c.name)
def test_reference_matches_numpy(case):
  lhs, rhs, sizes, _ = make_inputs(case)
  out = api.grouped_matmul(lhs, rhs, sizes, implementation="reference", preferred_element_type=case.out_dtype)
  assert out.dtype == (case.out_dtype or case.dtype) and out.shape == (case.m, case.n)
  want = numpy_grouped(jnp.asarray(lhs, jnp.float32), jnp.asarray(rhs, jnp.float32), case.sizes)
  assert not want[sum(case.sizes):].any() and np.abs(want).max() > 0.1
  assert_close(out, want, 1e-5 if out.dtype == jnp.float32 else TOL[jnp.bfloat16], "reference")
  ct = np.random.default_rng(3).standard_normal((case.m, case.n))
  want_rhs = np.zeros(rhs.shape)
  start = 0
  for g, size in enumerate(case.sizes):
    want_rhs[g] = np.asarray(lhs, np.float64)[start:start + size].T @ ct[start:start + size]
    start += size
  got = reference.tgmm(lhs, jnp.asarray(ct, jnp.float32), sizes, preferred_element_type=jnp.float32)
  assert_close(got, want_rhs, 1e-5, "reference tgmm")


@functools.lru_cache(maxsize=None)
def _reference_value_and_grads(case: Case):
  """The reference's (out, d lhs, d rhs) on make_inputs(case, seed=1), computed once per case."""
  fn = functools.partial(reference.grouped_matmul, preferred_element_type=case.out_dtype)
  return value_and_grads(fn, *make_inputs(case, seed=1))


@pytest.mark.parametrize("case,impl", PAIRS, ids=[f"{c.name}-{i}" for c, i in PAIRS])
def test_matches_reference(case, impl):
  """Forward and both gradients against the reference's (JAX autodiff of the masked loop)."""
  lhs, rhs, sizes, ct = make_inputs(case, seed=1)
  want = _reference_value_and_grads(case)
  got = value_and_grads(functools.partial(IMPLS[impl], preferred_element_type=case.out_dtype), lhs, rhs, sizes, ct)
  assert got[0].dtype == (case.out_dtype or case.dtype) and got[1].dtype == lhs.dtype and got[2].dtype == rhs.dtype
  tol = TOL[case.dtype]
  for what, a, b in zip(("out", "d_lhs", "d_rhs"), got, want):
    assert_close(a, b, tol, f"{impl} {case.name} {what}")


@pytest.mark.parametrize("impl", list(TGMM))
def test_tgmm_kernels_many_tiles(impl):
  """The d_rhs kernels alone over several row tiles (TPU's lane-sized 128-row tiles too): groups spanning and
  sharing tiles, two empty groups (their [K, N] blocks must be written as zeros), rows past the groups."""
  rng = np.random.default_rng(4)
  sizes = jnp.asarray([70, 0, 1, 90, 0, 20], jnp.int32)  # 181 of 190 rows
  lhs = jnp.asarray(rng.standard_normal((190, 20)), jnp.float32)
  dout = jnp.asarray(rng.standard_normal((190, 24)), jnp.float32)
  got = jax.jit(TGMM[impl])(lhs, dout, sizes)
  assert_close(got, reference.tgmm(lhs, dout, sizes), TOL[jnp.float32], f"{impl} tgmm")


def test_default_is_xla_on_cpu_and_logged_once(caplog):
  lhs, rhs, sizes, _ = make_inputs(CASES[0], seed=2)
  want = api.grouped_matmul(lhs, rhs, sizes, implementation="reference")
  api.OP.forget_choices()
  with caplog.at_level(logging.INFO, logger="pallas_kernels.op"):
    out = jax.jit(api.grouped_matmul)(lhs, rhs, sizes)
    api.grouped_matmul(lhs, rhs, sizes)
  assert sum("'xla'" in r.getMessage() and "grouped_matmul" in r.getMessage() for r in caplog.records) == 1
  assert_close(out, want, TOL[jnp.float32], "default")


def test_unavailable_implementations_raise():
  lhs, rhs, sizes, _ = make_inputs(CASES[0])
  assert_forced_implementations(lambda impl: api.grouped_matmul(lhs, rhs, sizes, implementation=impl), api)


@pytest.mark.parametrize("platform,impl,marker", [("cuda", gpu, "triton"), ("tpu", tpu, "tpu_custom_call")])
def test_pallas_lowers_for_hardware(platform, impl, marker):
  """Forward and backward lower for the real backend at an MoE shape (bf16, 512 tokens, 8 experts,
  1024 -> 768): three kernels under grad (gmm, the d_lhs gmm, the d_rhs tgmm)."""
  lhs = jnp.ones((512, 1024), jnp.bfloat16)
  rhs = jnp.ones((8, 1024, 768), jnp.bfloat16)
  sizes = jnp.full((8,), 64, jnp.int32)
  loss = lambda x, w, s: jnp.sum(impl.grouped_matmul(x, w, s).astype(jnp.float32))  # noqa: E731
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(lhs, rhs, sizes).lower(lowering_platforms=(platform,)).as_text()
  assert text.count(marker) >= 3


_L, _R, _S = jnp.ones((6, 4)), jnp.ones((3, 4, 5)), jnp.asarray([2, 2, 2], jnp.int32)


@pytest.mark.parametrize("args,kw,match", [
    ((_L[0], _R, _S), {}, "lhs must have rank 2"),
    ((_L, _R[0], _S), {}, "rhs must have rank 3"),
    ((_L, _R[:, :3], _S), {}, "rhs K=3 .* does not match lhs K=4"),
    ((_L, _R.astype(jnp.bfloat16), _S), {}, "lhs and rhs must share one dtype"),
    ((_L.astype(jnp.int32), _R, _S), {}, "lhs must be a floating"),
    ((_L, _R, _S.astype(jnp.float32)), {}, "group_sizes must be an integer"),
    ((_L, _R, _S[:2]), {}, "group_sizes must have length G=3"),
    ((_L, _R, _S[None]), {}, "group_sizes must have rank 1"),
    ((_L, _R, jnp.asarray([2, -1, 2], jnp.int32)), {}, "group_sizes must be non-negative"),
    ((_L, _R, jnp.asarray([2, 3, 2], jnp.int32)), {}, "sum to at most M=6"),
    ((_L, _R, _S), dict(preferred_element_type=jnp.int32), "preferred_element_type must be a floating"),
], ids=["lhs_rank", "rhs_rank", "k", "dtype", "lhs_int", "sizes_float", "sizes_len", "sizes_rank", "negative",
        "sum", "out_dtype"])
def test_bad_inputs(args, kw, match):
  with pytest.raises(ValueError, match=match):
    api.grouped_matmul(*args, implementation="reference", **kw)


@pytest.mark.parametrize("kw,match", [(dict(tm=24), "tm=24 .* power of two"), (dict(tn=8), "tn=8 .* >= 16")])
def test_bad_tiles(kw, match):
  with pytest.raises(ValueError, match=match):
    gpu.grouped_matmul(_L, _R, _S, **kw)


@pytest.mark.parametrize("lhs_shape,rhs_shape", [((0, 4), (2, 4, 3)), ((5, 0), (2, 0, 3)), ((5, 4), (2, 4, 0))],
                         ids=["no_rows", "k0", "n0"])
def test_empty_operands_give_zeros(lhs_shape, rhs_shape):
  lhs, rhs = jnp.ones(lhs_shape), jnp.ones(rhs_shape)
  sizes = jnp.asarray([0, lhs_shape[0]], jnp.int32)
  for impl in ("xla", "pallas_gpu"):
    out = api.grouped_matmul(lhs, rhs, sizes, implementation=impl, interpret=True)
    assert out.shape == (lhs_shape[0], rhs_shape[2]) and not jnp.any(out)
