"""FlashAttention-2 implementations against the float32 reference, forward and gradients, on CPU.

Every implementation that can run on CPU is checked: "xla" directly, "pallas_gpu" through the generic Pallas
interpreter (interpret=True), "pallas_tpu" through TPU interpret mode (pltpu.InterpretParams). Small blocks
(16-64) make several tiles per sequence so tile skipping, ragged last blocks and padding are all exercised.
"reference" itself is checked against a brute-force numpy loop.

Tolerances (max abs error <= tol * max(1, max |reference|), i.e. absolute for O(1) values):
  float32: 1e-5 on outputs and lse, 2e-5 on gradients. Both sides compute in float32 and differ only in
    summation order (online-softmax rescaling, blockwise dK/dV accumulation over GQA heads and query
    blocks): observed <= 1e-6 on every case, so this leaves a 10x margin and still catches any masking or
    indexing bug (those give errors of order 1e-1..1).
  bfloat16: 1.5e-2 on outputs, 2e-2 on gradients, 1e-5 on lse. Both sides see the same bf16 inputs, but
    the kernels feed P and dS to the matmuls in bf16 (8-bit mantissa) and both round O/dQ/dK/dV to bf16
    on the way out, so one bf16 ulp at the top of the range (2^-8 ~ 3.9e-3 relative) is the noise floor;
    observed <= 5.3e-3, the tolerance is ~4-5 ulps. lse stays float32 from float32 accumulation (observed
    <= 2e-7).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.flash_attention import api, gpu, tiles, tpu, xla
from pallas_kernels.flash_attention.reference import attention_reference
from testlib import assert_close, assert_forced_implementations, packed_segments, randn, slow_when

# ------------------------------------------------------------------------------------------------- helpers

IMPLS = {
    "xla": functools.partial(xla.flash_attention, block_q=32, block_k=64),
    "pallas_gpu": functools.partial(gpu.flash_attention, interpret=True, block_q=32, block_k=32,
                                    block_q_bwd=16, block_k_bwd=32),
    "pallas_tpu": functools.partial(tpu.flash_attention, interpret=True, block_q=32, block_k=64,
                                    block_q_bwd=64, block_k_bwd=32),
}

TOL = {  # (outputs, lse, grads): see module docstring
    jnp.float32: (1e-5, 1e-5, 2e-5),
    jnp.bfloat16: (1.5e-2, 1e-5, 2e-2),
}
F32_OUT, F32_LSE, F32_GRAD = TOL[jnp.float32]


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  batch: int = 1
  q_len: int = 96
  kv_len: int = 96
  q_heads: int = 4
  kv_heads: int = 2
  head_dim: int = 64
  dtype: type = jnp.float32
  causal: bool = True
  chunked: bool = False  # q positions = kv_len - q_len + arange (chunked prefill)
  striped: bool = False  # positions permuted as in a striped sequence-parallel layout
  window: int | None = None
  soft_cap: float | None = None
  segments: bool = False  # packed segments
  impls: tuple = ()


ALL = ("xla", "pallas_gpu", "pallas_tpu")
NO_TPU = ("xla", "pallas_gpu")
TPU = ("pallas_tpu",)  # TPU interpret mode costs ~10 ms per grid step: it gets its own cases with few heads
CASES = [
    Case("chunked_prefill_gqa4", q_len=72, kv_len=200, q_heads=8, kv_heads=2, chunked=True, impls=NO_TPU),
    Case("chunked_prefill_mqa4", q_len=72, kv_len=200, q_heads=4, kv_heads=1, chunked=True, impls=TPU),
    Case("noncausal_mqa_d128", q_len=100, kv_len=130, q_heads=4, kv_heads=1, head_dim=128, causal=False,
         impls=NO_TPU),
    Case("window_gqa2", batch=2, q_len=150, kv_len=150, window=40, impls=NO_TPU),
    Case("packed_segments_gqa8_softcap", q_len=160, kv_len=160, q_heads=8, kv_heads=1, segments=True,
         soft_cap=5.0, impls=NO_TPU),
    Case("packed_segments_window_softcap_gqa2", batch=2, q_len=96, kv_len=96, q_heads=2, kv_heads=1,
         segments=True, window=24, soft_cap=5.0, impls=TPU),
    Case("striped_mha_window", q_len=128, kv_len=128, q_heads=2, kv_heads=2, striped=True, window=50, impls=ALL),
    Case("noncausal_window_segments", batch=2, q_len=90, kv_len=110, causal=False, window=30, segments=True,
         chunked=True, impls=NO_TPU),
    Case("bf16_gqa2_softcap", batch=2, q_len=130, kv_len=130, head_dim=128, dtype=jnp.bfloat16, soft_cap=20.0,
         impls=NO_TPU),
    Case("bf16_noncausal_mha_d128", q_len=100, kv_len=130, q_heads=2, kv_heads=2, head_dim=128,
         dtype=jnp.bfloat16, causal=False, impls=TPU),
    Case("bf16_chunked_segments", q_len=64, kv_len=192, q_heads=4, kv_heads=1, dtype=jnp.bfloat16, chunked=True,
         segments=True, impls=NO_TPU),
]


@functools.lru_cache(maxsize=None)
def make_inputs(case: Case):
  """Fresh random q/k/v and mask arguments for a case (cached: every implementation sees the same ones)."""
  b, lq, lk = case.batch, case.q_len, case.kv_len
  q = randn((b, lq, case.q_heads, case.head_dim), f"{case.name}/q", case.dtype)
  k = randn((b, lk, case.kv_heads, case.head_dim), f"{case.name}/k", case.dtype)
  v = randn((b, lk, case.kv_heads, case.head_dim), f"{case.name}/v", case.dtype)
  kw = dict(causal=case.causal, sliding_window=case.window, logits_soft_cap=case.soft_cap)
  if case.chunked:
    kw["q_positions"] = jnp.broadcast_to(lk - lq + jnp.arange(lq, dtype=jnp.int32), (b, lq))
  if case.striped:
    assert lq == lk and lq % 4 == 0
    stripe = jnp.arange(lq, dtype=jnp.int32)
    pos = (stripe % (lq // 4)) * 4 + stripe // (lq // 4)  # token t of stripe s holds position 4 t + s
    kw["q_positions"] = kw["kv_positions"] = jnp.broadcast_to(pos, (b, lq))
  if case.segments:
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    if lq == lk:
      seg = packed_segments(rng, b, lq, 3)
      kw["q_segment_ids"] = kw["kv_segment_ids"] = seg
    else:  # chunked: the chunk's segments are the last ones of the cache
      seg = packed_segments(rng, b, lk, 3)
      kw["kv_segment_ids"] = seg
      kw["q_segment_ids"] = seg[:, lk - lq:]
  return q, k, v, kw


def run(fn, q, k, v, kw, lse_cotangent=True):
  """One jit: forward (o, lse) and the VJP with random cotangents for o and (optionally) lse."""
  static = {n: kw[n] for n in ("causal", "sliding_window", "logits_soft_cap") if n in kw}
  arrays = {n: x for n, x in kw.items() if n not in static}
  b, lq, hq, _ = q.shape
  tag = f"{q.shape}{q.dtype}"  # cotangents depend on the query side only
  do = randn(q.shape, f"do{tag}", q.dtype)
  dlse = randn((b, hq, lq), f"dlse{tag}") if lse_cotangent else jnp.zeros((b, hq, lq), jnp.float32)

  def full(q, k, v, arrays, do, dlse):
    (o, lse), vjp = jax.vjp(lambda q, k, v: fn(q, k, v, return_lse=True, **static, **arrays), q, k, v)
    return o, lse, vjp((do, dlse))

  return jax.jit(full)(q, k, v, arrays, do, dlse)


# ---------------------------------------------------------------------------------- implementations vs ref


@functools.lru_cache(maxsize=None)
def _reference_results(case: Case):
  q, k, v, kw = make_inputs(case)
  return run(attention_reference, q, k, v, kw)


@pytest.mark.parametrize("case,impl", [slow_when(i == "pallas_tpu", c, i) for c in CASES for i in c.impls],
                         ids=[f"{c.name}-{i}" for c in CASES for i in c.impls])
def test_matches_reference(case, impl):
  q, k, v, kw = make_inputs(case)
  o, lse, grads = run(IMPLS[impl], q, k, v, kw)
  o_ref, lse_ref, grads_ref = _reference_results(case)
  tol_o, tol_lse, tol_g = TOL[case.dtype]
  assert o.dtype == q.dtype and o.shape == q.shape
  assert lse.dtype == jnp.float32 and lse.shape == (case.batch, case.q_heads, case.q_len)
  assert_close(o, o_ref, tol_o, "out")
  assert_close(lse, lse_ref, tol_lse, "lse")
  for name, g, g_ref, x in zip(("dq", "dk", "dv"), grads, grads_ref, (q, k, v)):
    assert g.dtype == x.dtype and g.shape == x.shape
    assert_close(g, g_ref, tol_g, name)


# ------------------------------------------------------------------------------------- fully masked rows


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu", slow_when(True, "pallas_tpu")])
def test_fully_masked_rows(impl):
  """Queries whose segment has no key, and (causal) queries positioned before every key: zeros, lse = -inf,
  finite gradients equal to the reference's."""
  b, lq, lk, hq, hkv, d = 1, 40, 70, 2, 1, 64
  q, k, v = (randn(s, f"masked/{n}") for n, s in (("q", (b, lq, hq, d)), ("k", (b, lk, hkv, d)),
                                                  ("v", (b, lk, hkv, d))))
  q_seg = jnp.where(jnp.arange(lq) < 30, 0, 7)[None].astype(jnp.int32)  # rows 30.. : segment 7, no such key
  kv_seg = jnp.zeros((b, lk), jnp.int32)
  q_pos = (jnp.arange(lq, dtype=jnp.int32) + 5)[None]
  kv_pos = (jnp.arange(lk, dtype=jnp.int32) + 20)[None]  # rows with q_pos < 20 (0..14) see nothing either
  kw = dict(causal=True, q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
  o, lse, grads = run(IMPLS[impl], q, k, v, kw, lse_cotangent=False)
  o_ref, lse_ref, grads_ref = run(attention_reference, q, k, v, kw, lse_cotangent=False)
  dead = np.zeros(lq, bool)
  dead[30:] = True
  dead[:15] = True
  assert np.all(np.asarray(o)[:, dead] == 0.0)
  assert np.all(np.isneginf(np.asarray(lse)[:, :, dead]))
  assert np.all(np.isfinite(np.asarray(lse)[:, :, ~dead]))
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(grads[0])[:, dead] == 0.0)
  assert_close(o, o_ref, F32_OUT, "out")
  assert_close(lse, lse_ref, F32_LSE, "lse")
  for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
    assert_close(g, g_ref, F32_GRAD, name)


# -------------------------------------------------------------------------------------------- tile skipping


def test_tile_visibility_causal_is_about_half():
  L, blk = 512, 64
  pos = jnp.arange(L, dtype=jnp.int32)[None]
  vis = pallas_kernels.tile_visibility(pos, pos, None, None, causal=True, sliding_window=None, block_q=blk,
                                       block_k=blk)
  n = L // blk
  assert vis.shape == (1, n, n)
  assert int(vis.sum()) == n * (n + 1) // 2  # lower triangle incl. diagonal: 36 of 64
  assert np.array_equal(np.asarray(vis[0]), np.tril(np.ones((n, n), bool)))
  _, counts = tiles.block_lists(vis)
  assert counts.tolist() == [list(range(1, n + 1))]
  # A window of one block keeps the diagonal band only; segments keep the block diagonal.
  vis_w = pallas_kernels.tile_visibility(pos, pos, None, None, causal=True, sliding_window=blk, block_q=blk,
                                         block_k=blk)
  assert int(vis_w.sum()) == 2 * n - 1
  seg = (jnp.arange(L) // 128).astype(jnp.int32)[None]
  vis_s = pallas_kernels.tile_visibility(None, None, seg, seg, causal=False, sliding_window=None,
                                         block_q=blk, block_k=blk)
  assert int(vis_s.sum()) == (L // 128) * (128 // blk) ** 2


@pytest.mark.parametrize("seed", [0, 1])
def test_tile_visibility_is_conservative(seed):
  """Every tile holding a visible pair is marked, on random (unsorted) positions, ragged lengths, windows."""
  from pallas_kernels.flash_attention.masks import visible_mask
  rng = np.random.default_rng(seed)
  b, lq, lk, bq, bk = 2, 45, 77, 8, 16
  qp = jnp.asarray(rng.integers(0, 100, (b, lq)), jnp.int32)
  kp = jnp.asarray(rng.integers(0, 100, (b, lk)), jnp.int32)
  qs = jnp.asarray(np.sort(rng.integers(0, 3, (b, lq)), axis=-1), jnp.int32)
  kss = jnp.asarray(np.sort(rng.integers(0, 3, (b, lk)), axis=-1), jnp.int32)
  for causal, window in ((True, None), (True, 10), (False, 25)):
    vis = np.asarray(tiles.tile_visibility(qp, kp, qs, kss, causal=causal, sliding_window=window,
                                           block_q=bq, block_k=bk))
    mask = np.asarray(visible_mask(b, lq, lk, causal=causal, q_positions=qp, kv_positions=kp,
                                   q_segment_ids=qs, kv_segment_ids=kss, sliding_window=window))
    nq, nk = -(-lq // bq), -(-lk // bk)
    assert vis.shape == (b, nq, nk)
    padded = np.zeros((b, nq * bq, nk * bk), bool)
    padded[:, :lq, :lk] = mask
    any_pair = padded.reshape(b, nq, bq, nk, bk).any(axis=(2, 4))
    assert np.all(vis | ~any_pair), "a tile with a visible pair was marked hidden"
    assert vis.sum() < vis.size  # and it does skip something


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu", slow_when(True, "pallas_tpu")])
def test_hidden_tiles_are_not_computed(impl):
  """Keys no query can see (own segment) hold NaN: any kernel that touched their tiles would return NaN."""
  b, lq, lk, h, d = 1, 48, 128, 1, 64
  q, k, v = (randn(s, f"hidden/{n}") for n, s in (("q", (b, lq, h, d)), ("k", (b, lk, h, d)), ("v", (b, lk, h, d))))
  hidden = jnp.arange(lk) >= 64  # kv blocks of 64 (and 32) beyond 64 are hidden from every query
  k_nan = jnp.where(hidden[None, :, None, None], jnp.nan, k)
  v_nan = jnp.where(hidden[None, :, None, None], jnp.nan, v)
  kw = dict(causal=False, q_segment_ids=jnp.zeros((b, lq), jnp.int32),
            kv_segment_ids=hidden.astype(jnp.int32)[None])
  o, lse, (dq, dk, dv) = run(IMPLS[impl], q, k_nan, v_nan, kw, lse_cotangent=False)
  o_ref, lse_ref, (dq_ref, dk_ref, dv_ref) = run(attention_reference, q, k[:, :64], v[:, :64], dict(causal=False),
                                                  lse_cotangent=False)
  assert_close(o, o_ref, F32_OUT, "out")
  assert_close(lse, lse_ref, F32_LSE, "lse")
  assert_close(dq, dq_ref, F32_GRAD, "dq")
  assert_close(dk[:, :64], dk_ref, F32_GRAD, "dk")
  assert np.all(np.asarray(dk[:, 64:]) == 0) and np.all(np.asarray(dv[:, 64:]) == 0)


# ------------------------------------------------------------------------------- hardware lowering on CPU


def _lower_fwd_bwd(fn, platform, dtype, q_len=300, **kw):
  q = jnp.ones((1, q_len, 4, 128), dtype)
  k = jnp.ones((1, 300, 1, 128), dtype)
  q_seg, kv_seg = jnp.zeros((1, q_len), jnp.int32), jnp.zeros((1, 300), jnp.int32)
  q_pos = jnp.broadcast_to(300 - q_len + jnp.arange(q_len, dtype=jnp.int32), (1, q_len))

  def loss(q, k, v):
    o, lse = fn(q, k, v, return_lse=True, q_positions=q_pos, q_segment_ids=q_seg, kv_segment_ids=kv_seg, **kw)
    return o.astype(jnp.float32).sum() + lse.sum()

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("dtype,q_len", [(jnp.bfloat16, 300), (jnp.float32, 300), (jnp.bfloat16, 1)])
def test_pallas_gpu_lowers_to_triton(dtype, q_len):
  """The Triton lowering (power-of-two tiles, supported primitives) runs without a GPU."""
  txt = _lower_fwd_bwd(gpu.flash_attention, "cuda", dtype, q_len, sliding_window=64, logits_soft_cap=30.0)
  assert txt.count("triton") >= 3  # forward, dq, dk/dv kernels


@pytest.mark.parametrize("dtype,q_len", [(jnp.bfloat16, 300), (jnp.float32, 300), (jnp.bfloat16, 1)])
def test_pallas_tpu_lowers_to_mosaic(dtype, q_len):
  """Mosaic TPU lowering, including the (8, 128) block-shape rules, with hardware block sizes."""
  txt = _lower_fwd_bwd(tpu.flash_attention, "tpu", dtype, q_len, sliding_window=64, logits_soft_cap=30.0,
                       block_q=256, block_k=128)
  assert txt.count("tpu_custom_call") >= 3


# ------------------------------------------------------------------------------------ reference and the API


def test_reference_matches_bruteforce():
  """attention_reference (which all kernels are checked against) against a plain numpy loop."""
  rng = np.random.default_rng(0)
  b, lq, lk, hq, hkv, d = 2, 5, 9, 4, 2, 8
  q, k, v = (rng.standard_normal(s).astype(np.float32) for s in
             ((b, lq, hq, d), (b, lk, hkv, d), (b, lk, hkv, d)))
  qp = np.array([[4, 5, 6, 7, 8], [0, 9, 3, 7, 1]], np.int32)
  kp = np.tile(np.arange(lk, dtype=np.int32), (b, 1))
  qs = np.array([[0, 0, 1, 1, 2], [0, 0, 0, 1, 1]], np.int32)
  kss = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1, 1]], np.int32)
  window, cap, scale = 4, 2.0, 0.3
  o, lse = attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=True, sm_scale=scale,
                               q_positions=jnp.asarray(qp), kv_positions=jnp.asarray(kp),
                               q_segment_ids=jnp.asarray(qs), kv_segment_ids=jnp.asarray(kss),
                               sliding_window=window, logits_soft_cap=cap, return_lse=True)
  group = hq // hkv
  for bi in range(b):
    for h in range(hq):
      for i in range(lq):
        vis = [j for j in range(lk) if kp[bi, j] <= qp[bi, i] and qp[bi, i] - kp[bi, j] < window
               and qs[bi, i] == kss[bi, j]]
        if not vis:
          assert np.all(np.asarray(o)[bi, i, h] == 0) and np.isneginf(np.asarray(lse)[bi, h, i])
          continue
        s = np.array([cap * np.tanh(scale * q[bi, i, h] @ k[bi, j, h // group] / cap) for j in vis])
        p = np.exp(s - s.max())
        np.testing.assert_allclose(np.asarray(o)[bi, i, h], (p / p.sum()) @ v[bi, vis, h // group],
                                   atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(lse)[bi, h, i], s.max() + np.log(p.sum()), atol=1e-5)


def test_public_api_default_is_xla_on_cpu(caplog):
  case = Case("api", q_len=70, kv_len=70, window=33)
  q, k, v, kw = make_inputs(case)
  api.OP.forget_choices()
  with caplog.at_level(logging.INFO, logger="pallas_kernels.op"):
    o = pallas_kernels.flash_attention(q, k, v, **kw)
    o2 = pallas_kernels.flash_attention(q, k, v, **kw)
  assert sum("'xla'" in r.getMessage() and "flash_attention" in r.getMessage() for r in caplog.records) == 1
  o_ref = jax.jit(lambda q, k, v: attention_reference(q, k, v, **kw))(q, k, v)  # eagerly: one compile per op
  assert_close(o, o_ref, F32_OUT, "out")
  assert np.array_equal(np.asarray(o), np.asarray(o2))
  # Explicit implementations through the public function (interpret mode for the Pallas one), under jit.
  for impl in ("reference", "pallas_gpu"):
    out, lse = jax.jit(lambda q, k, v, impl=impl: pallas_kernels.flash_attention(
        q, k, v, implementation=impl, interpret=True, return_lse=True, **kw))(q, k, v)
    assert_close(out, o_ref, F32_OUT, impl)
    assert lse.shape == (1, 4, 70)


def test_unavailable_implementations_raise():
  q = randn((1, 8, 2, 16), "unavailable")
  assert_forced_implementations(lambda impl: pallas_kernels.flash_attention(q, q, q, implementation=impl), api,
                                interpreted={"reference", "xla", "pallas_gpu", "pallas_tpu"})  # not cudnn
  with pytest.raises(RuntimeError, match="cudnn"):
    pallas_kernels.flash_attention(q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), q.astype(jnp.bfloat16),
                                   implementation="cudnn", interpret=True)


def test_cudnn_rejects_masks_it_cannot_express():
  from pallas_kernels.flash_attention import cudnn
  q = randn((1, 8, 2, 16), "cudnn", jnp.bfloat16)
  seg = jnp.zeros((1, 8), jnp.int32)
  for kw, word in ((dict(q_segment_ids=seg, kv_segment_ids=seg), "segment"), (dict(q_positions=seg), "positions"),
                   (dict(logits_soft_cap=5.0), "soft_cap"), (dict(causal=False, sliding_window=4), "window")):
    with pytest.raises(ValueError, match=f"cudnn.*{word}"):
      cudnn.flash_attention(q, q, q, **kw)
  with pytest.raises(ValueError, match="float32"):
    cudnn.flash_attention(q.astype(jnp.float32), q.astype(jnp.float32), q.astype(jnp.float32))


_Q = jnp.zeros((2, 8, 4, 16))
_K = jnp.zeros((2, 8, 2, 16))
_POS = jnp.zeros((2, 8), jnp.int32)


@pytest.mark.parametrize("args,kw,match", [
    ((_Q[0], _K, _K), {}, "q must have rank 4"),
    ((_Q, _K[..., :8], _K[..., :8]), {}, "head_dim"),
    ((_Q, _K, _K[:, :4]), {}, "v must have the shape of k"),
    ((_Q[:1], _K, _K), {}, "batch"),
    ((_Q[:, :, :3], _K, _K), {}, "q_heads"),
    ((_Q, _K.astype(jnp.bfloat16), _K), {}, "dtype"),
    ((_Q, _K, _K), dict(q_positions=_POS[:, :5]), "q_positions"),
    ((_Q, _K, _K), dict(kv_positions=_POS.astype(jnp.float32)), "kv_positions"),
    ((_Q, _K, _K), dict(q_segment_ids=_POS), "kv_segment_ids"),
    ((_Q, _K, _K), dict(q_segment_ids=_POS, kv_segment_ids=_POS[:1]), "kv_segment_ids"),
    ((_Q, _K, _K), dict(sliding_window=0), "sliding_window"),
    ((_Q, _K, _K), dict(logits_soft_cap=-1.0), "logits_soft_cap"),
], ids=["rank", "head_dim", "v_shape", "batch", "heads", "dtype", "q_pos_shape", "kv_pos_dtype", "one_segment",
        "segment_shape", "window", "soft_cap"])
@pytest.mark.parametrize("impl", ["reference", "xla", "pallas_gpu", "pallas_tpu"])
def test_bad_inputs(args, kw, match, impl):
  with pytest.raises(ValueError, match=match):
    pallas_kernels.flash_attention(*args, implementation=impl, interpret=True, **kw)


@pytest.mark.parametrize("fn,kw,match", [
    (gpu.flash_attention, dict(interpret=True, block_q=48), "block_q=48.*power of two"),
    (gpu.flash_attention, dict(interpret=True, block_k_bwd=8), "block_k_bwd=8.*>= 16"),
    (tpu.flash_attention, dict(interpret=True, block_k=20), "block_k=20.*multiple of 8"),
    (tpu.flash_attention, dict(interpret=False, block_q=192), "block_q=192.*multiple of 128"),
    (xla.flash_attention, dict(block_q=0), "block_q=0"),
])
def test_bad_block_sizes(fn, kw, match):
  with pytest.raises(ValueError, match=match):
    fn(_Q, _K, _K, **kw)
