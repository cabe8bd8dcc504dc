"""decode_attention (split-K over a contiguous KV cache): every implementation against the float32 reference,
and the reference against dense attention (flash_attention(implementation="reference")) with the new token at
position kv_len - 1.

Fresh random inputs with kv_len 0 rows, lengths that are not block multiples, GQA 1/4 and MQA, windows, soft
cap, float32 and bfloat16, one and several splits; every slot the new token may not see (past kv_len, outside
the window) holds NaN, so an implementation that lets one through fails loudly.

Tolerances (max abs error <= tol * max(1, max |expected|)):
  float32 2e-5: both sides compute in float32; only the summation order differs (split-K partials merged by
    log-sum-exp, online softmax over blocks), a few ulps.
  bfloat16 2e-2 on outputs: same bf16 inputs, but the implementations feed P to the P V matmul in bf16
    (relative rounding 2^-9 per element) and round the output to bf16; lse stays float32: 1e-4.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.decode_attention import api, gpu, reference, tpu, xla
from testlib import assert_close, assert_forced_implementations, nan_outside

TOL = {jnp.float32: (2e-5, 2e-5), jnp.bfloat16: (2e-2, 1e-4)}

# Implementations runnable on CPU (Pallas ones in interpret mode), with small blocks so that several blocks
# and split ranges are exercised.
IMPLS = {
    "xla": xla.decode_attention,
    "pallas_gpu": functools.partial(gpu.decode_attention, interpret=True, block_k=16, split_granule=8),
    "pallas_tpu": functools.partial(tpu.decode_attention, interpret=True, block_k=8),
}


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  kv_lens: tuple = (45, 0, 1, 19)
  max_kv_len: int = 48
  q_heads: int = 4
  kv_heads: int = 1
  head_dim: int = 32
  dtype: type = jnp.float32
  window: int | None = None
  soft_cap: float | None = None
  sm_scale: float | None = None
  num_splits: int | None = None


CASES = [
    Case("mqa_splits4", num_splits=4),
    Case("gqa4_window_softcap_splits3", q_heads=8, kv_heads=2, window=13, soft_cap=7.0, num_splits=3,
         kv_lens=(64, 30, 0, 5), max_kv_len=64),
    Case("mha_one_split_odd_len", q_heads=2, kv_heads=2, head_dim=16, num_splits=1, kv_lens=(37, 2, 0),
         max_kv_len=37, sm_scale=0.3),
    Case("bf16_gqa2_default_splits", q_heads=4, kv_heads=2, dtype=jnp.bfloat16, kv_lens=(96, 50, 7),
         max_kv_len=96, window=40),
]


def make_inputs(case: Case, seed: int = 0):
  """(q, k with NaN in invisible slots, v likewise, kv_lens), and the NaN-free k, v."""
  rng = np.random.default_rng(seed)
  b, L = len(case.kv_lens), case.max_kv_len
  q = rng.standard_normal((b, case.q_heads, case.head_dim)).astype(np.float32)
  k = rng.standard_normal((b, L, case.kv_heads, case.head_dim)).astype(np.float32)
  v = rng.standard_normal((b, L, case.kv_heads, case.head_dim)).astype(np.float32)
  kv_lens = np.asarray(case.kv_lens, np.int32)
  j = np.arange(L)[None]
  vis = j < kv_lens[:, None]
  if case.window is not None:
    vis &= kv_lens[:, None] - 1 - j < case.window
  cast = lambda x: jnp.asarray(x).astype(case.dtype)
  return (cast(q), cast(nan_outside(k, vis)), cast(nan_outside(v, vis)), jnp.asarray(kv_lens)), (cast(k), cast(v))


def kwargs(case: Case):
  return dict(sm_scale=case.sm_scale, sliding_window=case.window, logits_soft_cap=case.soft_cap,
              num_splits=case.num_splits)


@functools.lru_cache(maxsize=None)
def _reference(case: Case):
  args, _ = make_inputs(case)
  return jax.jit(functools.partial(reference.decode_attention, return_lse=True, **kwargs(case)))(*args)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference_matches_dense_attention(case):
  (q, _, _, kv_lens), (k, v) = make_inputs(case)
  o, lse = _reference(case)
  kw = kwargs(case)
  del kw["num_splits"]
  o_dense, lse_dense = jax.jit(functools.partial(
      pallas_kernels.flash_attention, causal=True, return_lse=True, implementation="reference", **kw))(
          q[:, None], k, v, q_positions=(kv_lens - 1)[:, None])
  tol_o, tol_lse = TOL[case.dtype]
  assert o.dtype == q.dtype and o.shape == q.shape and lse.shape == q.shape[:2]
  assert_close(o, o_dense[:, 0], tol_o, "out")
  assert_close(lse, lse_dense[:, :, 0], tol_lse, "lse")
  dead = np.asarray(case.kv_lens) == 0
  assert np.all(np.asarray(o, np.float32)[dead] == 0) and np.all(np.isneginf(np.asarray(lse)[dead]))


@pytest.mark.parametrize("case,impl", [(c, i) for c in CASES for i in IMPLS],
                         ids=lambda x: x if isinstance(x, str) else x.name)
def test_matches_reference(case, impl):
  args, _ = make_inputs(case)
  o, lse = jax.jit(functools.partial(IMPLS[impl], return_lse=True, **kwargs(case)))(*args)
  o_ref, lse_ref = _reference(case)
  tol_o, tol_lse = TOL[case.dtype]
  assert o.dtype == case.dtype and o.shape == args[0].shape
  assert lse.dtype == jnp.float32 and lse.shape == args[0].shape[:2]
  assert_close(o, o_ref, tol_o, "out")
  assert_close(lse, lse_ref, tol_lse, "lse")


def test_public_api_default_is_xla_on_cpu(caplog):
  case = CASES[0]
  args, _ = make_inputs(case)
  api.OP.forget_choices()
  with caplog.at_level(logging.INFO, logger="pallas_kernels.op"):
    o = jax.jit(functools.partial(pallas_kernels.decode_attention, num_splits=2))(*args)
    jax.jit(pallas_kernels.decode_attention)(*args)
  assert sum("'xla'" in r.getMessage() and "decode_attention" in r.getMessage() for r in caplog.records) == 1
  assert_close(o, _reference(case)[0], 2e-5, "out")


@pytest.mark.parametrize("platform,impl,marker", [("cuda", gpu, "triton"), ("tpu", tpu, "tpu_custom_call")])
def test_pallas_lowers_for_hardware(platform, impl, marker):
  """Lowering for the real backend at benchmark-like sizes (bf16, head_dim 128, 2k keys, GQA 4)."""
  q = jnp.ones((4, 8, 128), jnp.bfloat16)
  k = jnp.ones((4, 2048, 2, 128), jnp.bfloat16)
  fn = jax.jit(functools.partial(impl.decode_attention, sliding_window=1000, num_splits=4))
  assert marker in fn.trace(q, k, k, jnp.ones((4,), jnp.int32)).lower(lowering_platforms=(platform,)).as_text()


def test_unavailable_implementations_raise():
  args, _ = make_inputs(CASES[0])
  assert_forced_implementations(lambda impl: pallas_kernels.decode_attention(*args, implementation=impl), api)


_Q = jnp.zeros((2, 4, 16))
_K = jnp.zeros((2, 8, 2, 16))
_KL = jnp.zeros((2,), jnp.int32)


@pytest.mark.parametrize("args,kw,match", [
    ((_Q[0], _K, _K, _KL), {}, "q must have rank 3"),
    ((_Q, _K[0], _K[0], _KL), {}, "k must have rank 4"),
    ((_Q, _K, _K[:, :4], _KL), {}, "v must have the shape of k"),
    ((_Q[:1], _K, _K, _KL[:1]), {}, "batch"),
    ((_Q, _K[..., :8], _K[..., :8], _KL), {}, "head_dim"),
    ((_Q[:, :3], _K, _K, _KL), {}, "q_heads"),
    ((_Q, _K.astype(jnp.bfloat16), _K.astype(jnp.bfloat16), _KL), {}, "dtype"),
    ((_Q.astype(jnp.int32), _K, _K, _KL), {}, "q must be a floating"),
    ((_Q, _K, _K, _KL[:1]), {}, "kv_lens"),
    ((_Q, _K, _K, _KL.astype(jnp.float32)), {}, "kv_lens must be an integer"),
    ((_Q, _K, _K, _KL), dict(num_splits=0), "num_splits"),
    ((_Q, _K, _K, _KL), dict(sliding_window=0), "sliding_window"),
    ((_Q, _K, _K, _KL), dict(logits_soft_cap=-1.0), "logits_soft_cap"),
    ((_Q, _K, _K, _KL), dict(sm_scale="x"), "sm_scale"),
], ids=["q_rank", "k_rank", "v_shape", "batch", "head_dim", "heads", "dtype", "q_int", "kv_lens_shape",
        "kv_lens_dtype", "splits", "window", "soft_cap", "sm_scale"])
@pytest.mark.parametrize("impl", list(api.IMPLEMENTATIONS))
def test_bad_inputs(args, kw, match, impl):
  with pytest.raises(ValueError, match=match):
    pallas_kernels.decode_attention(*args, implementation=impl, interpret=True, **kw)


# ------------------------------------------------------------------------------- quantized caches (int8/fp8)
# Random int8 / float8_e4m3fn codes with random float32 scales, per token [b, L, hkv, 1] or per channel of
# each sequence [b, 1, hkv, d]; the scales of invisible slots (per token) are NaN. Every implementation against
# the reference on the same cache; the reference against itself on the dequantized float32 cache (exact).

QUANT_CASES = [(CASES[1], "int8", "channel", "token"), (CASES[3], "float8_e4m3fn", "token", "token")]


def quantize_cache(x, dtype: str, kind: str, seed: int):
  rng = np.random.default_rng(seed)
  vis = ~np.isnan(np.asarray(x, np.float32)[..., 0, 0])  # [b, L]
  b, L, hkv, d = x.shape
  if dtype == "int8":
    codes = jnp.asarray(rng.integers(-127, 128, (b, L, hkv, d)).astype(np.int8))
  else:
    codes = jnp.asarray((rng.standard_normal((b, L, hkv, d)) * 60).astype(np.float32)).astype(jnp.float8_e4m3fn)
  if kind == "token":
    scales = rng.uniform(0.002, 0.05, (b, L, hkv, 1)).astype(np.float32)
    scales[~vis] = np.nan
  else:
    scales = rng.uniform(0.002, 0.05, (b, 1, hkv, d)).astype(np.float32)
  return codes, jnp.asarray(scales)


def quant_inputs(case, dtype, k_kind, v_kind):
  (q, k, v, kv_lens), _ = make_inputs(case)
  kq, ks = quantize_cache(k, dtype, k_kind, 1)
  vq, vs = quantize_cache(v, dtype, v_kind, 2)
  return (q, kq, vq, kv_lens), dict(k_scales=ks, v_scales=vs)


_QID = lambda x: x if isinstance(x, str) else f"{x[0].name}-{x[1]}-k{x[2]}-v{x[3]}"  # noqa: E731


@functools.lru_cache(maxsize=None)
def _quant_reference(qcase):
  args, scales = quant_inputs(*qcase)
  return jax.jit(functools.partial(reference.decode_attention, **scales, **kwargs(qcase[0])))(*args)


@pytest.mark.parametrize("qcase", QUANT_CASES, ids=_QID)
def test_quantized_reference_is_reference_on_dequantized_cache(qcase):
  (q, kq, vq, kv_lens), sc = quant_inputs(*qcase)
  real = lambda c, s: (c.astype(jnp.float32) * s).astype(q.dtype)  # noqa: E731
  expected = jax.jit(functools.partial(reference.decode_attention, **kwargs(qcase[0])))(
      q, real(kq, sc["k_scales"]), real(vq, sc["v_scales"]), kv_lens)
  assert_close(_quant_reference(qcase), expected, 0.0 if q.dtype == jnp.float32 else TOL[qcase[0].dtype][0], "out")


# pallas_tpu (the slowest in interpret mode) on the per-channel case only: it exercises scale rows shared by
# several pages of the contiguous cache's page view
@pytest.mark.parametrize("qcase,impl", [(c, i) for c in QUANT_CASES for i in IMPLS
                                        if i != "pallas_tpu" or c[2] == "channel"], ids=_QID)
def test_quantized_matches_reference(qcase, impl):
  args, scales = quant_inputs(*qcase)
  o = jax.jit(functools.partial(IMPLS[impl], **scales, **kwargs(qcase[0])))(*args)
  assert o.dtype == qcase[0].dtype and o.shape == args[0].shape
  assert_close(o, _quant_reference(qcase), TOL[qcase[0].dtype][0], "out")


def test_quantized_bad_scales():
  args, scales = quant_inputs(*QUANT_CASES[0])
  with pytest.raises(ValueError, match="k_scales and v_scales must be given together"):
    pallas_kernels.decode_attention(*args, k_scales=scales["k_scales"])
  with pytest.raises(ValueError, match="v_scales must be float32 of shape"):
    pallas_kernels.decode_attention(*args, k_scales=scales["k_scales"], v_scales=scales["v_scales"][:, :3])
