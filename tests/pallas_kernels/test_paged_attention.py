"""paged_attention and ragged_paged_attention: every implementation against the float32 reference, and the
reference against dense attention (flash_attention(implementation="reference")) on each sequence's pages
gathered into a contiguous cache with token positions.

Inputs are fresh random values with pages scattered in the pool (a random permutation of page ids), partially
filled last pages, kv_len 0 rows, GQA 1/4 and MQA, windows, soft cap, float32 and bfloat16, one and several
splits, ragged steps mixing prefill chunks (whose sequences already hold earlier chunks) with decode tokens,
padding rows and padding sequences (with junk cu_q_lens/kv_lens/page_table entries past num_seqs). Every
cache slot that no query may see (unreferenced pages, slots past kv_len in the last page, keys outside every
window) holds NaN, so an implementation that reads and uses one fails loudly.

Tolerances (max abs error <= tol * max(1, max |expected|)):
  float32 2e-5: both sides compute in float32; only the summation order differs (online softmax over pages,
    split-K merge), a few ulps.
  bfloat16 2e-2 on outputs: same bf16 inputs, but the kernels feed P to the P V matmul in bf16 (relative
    rounding 2^-9 per element) and round the output to bf16 (2^-9 relative); lse stays float32: 1e-4.
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
from pallas_kernels.paged_attention import api, gpu, reference, tpu, xla
from testlib import assert_close, assert_forced_implementations, nan_outside, random_page_table, slow_when

TOL = {jnp.float32: (2e-5, 2e-5), jnp.bfloat16: (2e-2, 1e-4)}

# Implementations runnable on CPU, with small blocks so several pages, items and splits are exercised.
PAGED_IMPLS = {
    "reference": reference.paged_attention,
    "xla": functools.partial(xla.paged_attention, keys_per_chunk=8),
    "pallas_gpu": functools.partial(gpu.paged_attention, interpret=True, block_k=16),
    "pallas_tpu": functools.partial(tpu.paged_attention, interpret=True, pages_per_block=2),
}
RAGGED_IMPLS = {
    "reference": reference.ragged_paged_attention,
    "xla": functools.partial(xla.ragged_paged_attention, block_q=4, keys_per_chunk=8),
    "xla_split": functools.partial(xla.ragged_paged_attention, block_q=8, num_splits=3, keys_per_chunk=4),
    "pallas_gpu": functools.partial(gpu.ragged_paged_attention, interpret=True, block_q=4, block_k=16),
    "pallas_gpu_split": functools.partial(gpu.ragged_paged_attention, interpret=True, block_q=8, block_k=16,
                                          num_splits=2),
    "pallas_tpu": functools.partial(tpu.ragged_paged_attention, interpret=True, block_q=4, num_splits=2,
                                    pages_per_block=3),
}


# ---------------------------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class Ragged:
  """A step: live sequences as (q_len, kv_len) pairs (kv_len includes the step's tokens)."""
  name: str
  seqs: tuple
  max_seqs: int = 6
  max_tokens: int = 40
  page_size: int = 4
  pages_per_seq: int = 12
  q_heads: int = 4
  kv_heads: int = 1
  head_dim: int = 32
  dtype: type = jnp.float32
  window: int | None = None
  soft_cap: float | None = None
  sm_scale: float | None = None

  @property
  def num_pages(self):
    return self.max_seqs * self.pages_per_seq + 5  # a few pages nobody owns


def make_step(case: Ragged, seed: int = 0):
  """Returns (args tuple for ragged_paged_attention, clean k/v pools without NaN, per-sequence info)."""
  rng = np.random.default_rng(seed)
  S, pps, ps = case.max_seqs, case.pages_per_seq, case.page_size
  num = len(case.seqs)
  assert num <= S and sum(q for q, _ in case.seqs) <= case.max_tokens
  shape = (case.num_pages, ps, case.kv_heads, case.head_dim)
  k_clean = rng.standard_normal(shape).astype(np.float32)
  v_clean = rng.standard_normal(shape).astype(np.float32)
  q = rng.standard_normal((case.max_tokens, case.q_heads, case.head_dim)).astype(np.float32)
  perm = random_page_table(rng, case.num_pages, S, pps)
  page_table = perm.copy()
  cu = np.zeros(S + 1, np.int32)
  kv_lens = np.zeros(S, np.int32)
  visible = np.zeros((case.num_pages, ps), bool)
  for s, (q_len, kv_len) in enumerate(case.seqs):
    assert (kv_len >= q_len or kv_len == 0) and kv_len <= pps * ps
    cu[s + 1] = cu[s] + q_len
    kv_lens[s] = kv_len
    first_pos = kv_len - q_len
    lo = 0 if case.window is None else max(0, first_pos - case.window + 1)
    for p in range(lo, kv_len):
      visible[page_table[s, p // ps], p % ps] = True
    used = -(-kv_len // ps)
    page_table[s, used:] = rng.integers(-3, case.num_pages + 3, pps - used)  # junk past the needed pages
  # Padding sequences: junk lengths and offsets that must be ignored.
  cu[num + 1:] = cu[num] + rng.integers(0, 4, S - num).cumsum()
  kv_lens[num:] = rng.integers(0, pps * ps, S - num)
  page_table[num:] = rng.integers(0, case.num_pages, (S - num, pps))
  k_nan, v_nan = nan_outside(k_clean, visible), nan_outside(v_clean, visible)
  cast = lambda x: jnp.asarray(x).astype(case.dtype)
  args = (cast(q), cast(k_nan), cast(v_nan), jnp.asarray(page_table), jnp.asarray(kv_lens), jnp.asarray(cu),
          jnp.int32(num))
  return args, (cast(k_clean), cast(v_clean), perm)


def ragged_kwargs(case):
  return dict(sm_scale=case.sm_scale, sliding_window=case.window, logits_soft_cap=case.soft_cap)


RAGGED_CASES = [
    # (0, 6): a live sequence with no new token this step; (13, 13): a first prefill chunk.
    Ragged("mixed_mqa", seqs=((9, 21), (1, 7), (0, 6), (1, 1), (13, 13), (1, 30)), max_seqs=7),
    Ragged("mixed_gqa4_window_softcap", seqs=((1, 40), (11, 30), (1, 5), (6, 17)), q_heads=8, kv_heads=2,
           window=9, soft_cap=8.0),
    Ragged("decode_only_mha", seqs=((1, 17), (1, 4), (1, 44), (1, 9)), q_heads=2, kv_heads=2, max_tokens=8,
           head_dim=16),
    Ragged("prefill_bf16_gqa2", seqs=((17, 37), (8, 8)), q_heads=4, kv_heads=2, dtype=jnp.bfloat16,
           sm_scale=0.2, page_size=8, pages_per_seq=6),
]


def dense_ragged(case: Ragged, args, clean):
  """Dense attention, one batch row per live sequence: flash_attention(reference) of all max_tokens query
  rows over the sequence's pages gathered into a contiguous cache (from the NaN-free pools), with the query
  positions of its chunk; segment ids keep the other sequences' rows and the slots past kv_len out. Rows of
  no sequence (padding) are zeros."""
  q, _, _, _, _, cu, _ = args
  k_clean, v_clean, perm = clean
  live = [s for s, (q_len, kv_len) in enumerate(case.seqs) if q_len and kv_len]
  cap = case.pages_per_seq * case.page_size
  t = np.arange(case.max_tokens)
  q_seg = np.full((len(live), case.max_tokens), 1, np.int32)
  q_pos = np.zeros((len(live), case.max_tokens), np.int32)
  kv_seg = np.full((len(live), cap), 2, np.int32)
  for i, s in enumerate(live):
    q_len, kv_len = case.seqs[s]
    rows = (t >= cu[s]) & (t < cu[s] + q_len)
    q_seg[i, rows] = 0
    q_pos[i] = kv_len - q_len + (t - int(cu[s]))
    kv_seg[i, :kv_len] = 0
  gather = lambda pool: pool[perm[np.asarray(live)]].reshape(len(live), cap, case.kv_heads, case.head_dim)
  fn = jax.jit(functools.partial(pallas_kernels.flash_attention, causal=True, return_lse=True,
                                 implementation="reference", **ragged_kwargs(case)))
  o, lse = fn(jnp.broadcast_to(q, (len(live), *q.shape)), gather(k_clean), gather(v_clean),
              q_positions=jnp.asarray(q_pos), q_segment_ids=jnp.asarray(q_seg),
              kv_segment_ids=jnp.asarray(kv_seg))
  o = np.asarray(o, np.float32).sum(0)  # each row is nonzero in at most one batch row
  lse = np.asarray(lse).max(0).T  # -inf except in its own sequence's row
  return o, lse


@functools.lru_cache(maxsize=None)
def _ragged_reference(case: Ragged):
  args, _ = make_step(case)
  return jax.jit(functools.partial(reference.ragged_paged_attention, return_lse=True, **ragged_kwargs(case)))(*args)


@pytest.mark.parametrize("case", RAGGED_CASES, ids=lambda c: c.name)
def test_ragged_reference_matches_dense_attention(case):
  args, clean = make_step(case)
  o, lse = _ragged_reference(case)
  o_dense, lse_dense = dense_ragged(case, args, clean)
  tol_o, tol_lse = TOL[case.dtype]
  assert o.dtype == case.dtype and o.shape == args[0].shape
  assert_close(o, o_dense, tol_o, "out")
  assert_close(lse, lse_dense, tol_lse, "lse")
  assert np.all(np.asarray(o, np.float32)[int(args[5][len(case.seqs)]):] == 0)  # padding rows


@pytest.mark.parametrize("case,impl", [slow_when(i == "pallas_tpu", c, i) for c in RAGGED_CASES for i in RAGGED_IMPLS
                                       if i != "reference"],
                         ids=lambda x: x if isinstance(x, str) else x.name)
def test_ragged_matches_reference(case, impl):
  args, _ = make_step(case)
  fn = jax.jit(functools.partial(RAGGED_IMPLS[impl], return_lse=True, **ragged_kwargs(case)))
  o, lse = fn(*args)
  o_ref, lse_ref = _ragged_reference(case)
  tol_o, tol_lse = TOL[case.dtype]
  assert o.dtype == case.dtype and o.shape == args[0].shape and lse.shape == args[0].shape[:2]
  assert_close(o, o_ref, tol_o, "out")
  assert_close(lse, lse_ref, tol_lse, "lse")


@pytest.mark.slow
def test_ragged_one_compilation_for_every_mix():
  """num_seqs and all lengths are dynamic: a second, different step reuses the compiled program."""
  a1, _ = make_step(RAGGED_CASES[0], seed=1)
  a2, _ = make_step(dataclasses.replace(RAGGED_CASES[0], seqs=((1, 3), (20, 25), (1, 9))), seed=2)
  fn = jax.jit(functools.partial(pallas_kernels.ragged_paged_attention, implementation="xla"))
  fn(*a1)
  o2 = fn(*a2)
  assert fn._cache_size() == 1
  assert_close(o2, reference.ragged_paged_attention(*a2), 2e-5, "out")


# ----------------------------------------------------------------------------------------- paged decode


@dataclasses.dataclass(frozen=True)
class Paged:
  name: str
  kv_lens: tuple = (37, 0, 1, 16, 23)
  page_size: int = 4
  pages_per_seq: int = 10
  q_heads: int = 4
  kv_heads: int = 1
  head_dim: int = 32
  dtype: type = jnp.float32
  window: int | None = None
  soft_cap: float | None = None
  num_splits: int | None = None


PAGED_CASES = [
    Paged("mqa_splits3", num_splits=3),
    Paged("gqa4_window_softcap", q_heads=8, kv_heads=2, window=6, soft_cap=10.0, num_splits=2),
    Paged("mha_one_split", q_heads=2, kv_heads=2, head_dim=16, num_splits=1, kv_lens=(40, 3, 0)),
    Paged("bf16_gqa2_page8", kv_lens=(64, 9, 33), page_size=8, pages_per_seq=8, q_heads=4, kv_heads=2,
          dtype=jnp.bfloat16, window=20),
]


def make_paged(case: Paged, seed: int = 0):
  """A decode batch as a ragged step of one-token sequences (same pool, NaN in every invisible slot)."""
  step = Ragged(case.name, seqs=tuple((1, n) for n in case.kv_lens), max_seqs=len(case.kv_lens),
                max_tokens=len(case.kv_lens), page_size=case.page_size, pages_per_seq=case.pages_per_seq,
                q_heads=case.q_heads, kv_heads=case.kv_heads, head_dim=case.head_dim, dtype=case.dtype,
                window=case.window, soft_cap=case.soft_cap)
  (q, kp, vp, pt, kv_lens, _, _), clean = make_step(step, seed)
  return (q, kp, vp, pt, kv_lens), clean, step


def paged_kwargs(case):
  return dict(sliding_window=case.window, logits_soft_cap=case.soft_cap, num_splits=case.num_splits)


@pytest.mark.parametrize("case", PAGED_CASES, ids=lambda c: c.name)
def test_paged_reference_matches_dense_attention(case):
  args, clean, step = make_paged(case)
  o, lse = jax.jit(functools.partial(reference.paged_attention, return_lse=True, **paged_kwargs(case)))(*args)
  step_args = (*args, jnp.arange(len(case.kv_lens) + 1, dtype=jnp.int32), jnp.int32(len(case.kv_lens)))
  o_dense, lse_dense = dense_ragged(step, step_args, clean)
  tol_o, tol_lse = TOL[case.dtype]
  assert_close(o, o_dense, tol_o, "out")
  assert_close(lse, lse_dense, tol_lse, "lse")
  dead = np.asarray(case.kv_lens) == 0
  assert np.all(np.asarray(o, np.float32)[dead] == 0) and np.all(np.isneginf(np.asarray(lse)[dead]))


@functools.lru_cache(maxsize=None)
def _paged_reference(case: Paged):
  args, _, _ = make_paged(case)
  return jax.jit(functools.partial(reference.paged_attention, **paged_kwargs(case)))(*args)


@pytest.mark.parametrize("case,impl", [slow_when(i == "pallas_tpu", c, i) for c in PAGED_CASES for i in PAGED_IMPLS
                                       if i != "reference"],
                         ids=lambda x: x if isinstance(x, str) else x.name)
def test_paged_matches_reference(case, impl):
  args, _, _ = make_paged(case)
  o = jax.jit(functools.partial(PAGED_IMPLS[impl], **paged_kwargs(case)))(*args)
  assert o.dtype == case.dtype and o.shape == args[0].shape
  assert_close(o, _paged_reference(case), TOL[case.dtype][0], "out")


# ------------------------------------------------------------------------------- hardware lowering on CPU


def _lower(fn, platform, dtype, ragged):
  """Lowers a paged or ragged call at realistic sizes (head_dim 128, page 16, GQA 4) for `platform`."""
  kp = jnp.ones((64, 16, 2, 128), dtype)
  if ragged:
    args = (jnp.ones((32, 8, 128), dtype), kp, kp, jnp.zeros((4, 16), jnp.int32), jnp.ones((4,), jnp.int32),
            jnp.zeros((5,), jnp.int32), jnp.int32(3))
  else:
    args = (jnp.ones((4, 8, 128), dtype), kp, kp, jnp.zeros((4, 16), jnp.int32), jnp.ones((4,), jnp.int32))
  fn = functools.partial(fn, sliding_window=64, logits_soft_cap=30.0)
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("ragged", [False, True], ids=["paged", "ragged"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_pallas_gpu_lowers_to_triton(dtype, ragged):
  """The Triton lowering (power-of-two tiles, gather loads, supported primitives) runs without a GPU."""
  fn = gpu.ragged_paged_attention if ragged else functools.partial(gpu.paged_attention, num_splits=2)
  assert "triton" in _lower(fn, "cuda", dtype, ragged)


@pytest.mark.parametrize("ragged", [False, True], ids=["paged", "ragged"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_pallas_tpu_lowers_to_mosaic(dtype, ragged):
  """Mosaic TPU lowering with scalar-prefetched page tables and (8, 128) block rules."""
  fn = tpu.ragged_paged_attention if ragged else functools.partial(tpu.paged_attention, num_splits=2)
  assert "tpu_custom_call" in _lower(fn, "tpu", dtype, ragged)


def test_pallas_gpu_rejects_odd_head_dim():
  q = jnp.zeros((2, 4, 24))
  kp = jnp.zeros((8, 4, 2, 24))
  with pytest.raises(ValueError, match="head_dim=24"):
    pallas_kernels.paged_attention(q, kp, kp, jnp.zeros((2, 4), jnp.int32), jnp.zeros((2,), jnp.int32),
                                   implementation="pallas_gpu", interpret=True)
  with pytest.raises(ValueError, match="block_k=24"):
    kp32 = jnp.zeros((8, 4, 2, 32))
    gpu.paged_attention(jnp.zeros((2, 4, 32)), kp32, kp32, jnp.zeros((2, 4), jnp.int32), jnp.zeros((2,), jnp.int32),
                        interpret=True, block_k=24)


# ------------------------------------------------------------------------------------------ public API


def test_public_api_default_is_xla_on_cpu(caplog):
  args, _, _ = make_paged(PAGED_CASES[0])
  api.OP.forget_choices()
  with caplog.at_level(logging.INFO, logger="pallas_kernels.op"):
    o = jax.jit(pallas_kernels.paged_attention)(*args)
    jax.jit(functools.partial(pallas_kernels.paged_attention, num_splits=2))(*args)
  assert sum("'xla'" in r.getMessage() and "paged_attention" in r.getMessage() for r in caplog.records) == 1
  assert_close(o, _paged_reference(PAGED_CASES[0]), 2e-5, "out")
  step_args, _ = make_step(RAGGED_CASES[0])
  o, lse = jax.jit(functools.partial(pallas_kernels.ragged_paged_attention, return_lse=True))(*step_args)
  assert_close(o, _ragged_reference(RAGGED_CASES[0])[0], 2e-5, "out")


def test_unavailable_implementations_raise():
  args, _, _ = make_paged(PAGED_CASES[0])
  assert_forced_implementations(lambda impl: pallas_kernels.paged_attention(*args, implementation=impl), api)
  step_args, _ = make_step(RAGGED_CASES[0])
  assert_forced_implementations(lambda impl: pallas_kernels.ragged_paged_attention(*step_args, implementation=impl),
                                api)


_Q = jnp.zeros((3, 4, 16))
_KP = jnp.zeros((10, 4, 2, 16))
_PT = jnp.zeros((3, 5), jnp.int32)
_KL = jnp.zeros((3,), jnp.int32)
_QR = jnp.zeros((12, 4, 16))
_PTR = jnp.zeros((4, 5), jnp.int32)
_KLR = jnp.zeros((4,), jnp.int32)
_CU = jnp.zeros((5,), jnp.int32)


@pytest.mark.parametrize("args,kw,match", [
    ((_Q[0], _KP, _KP, _PT, _KL), {}, "q must have rank 3"),
    ((_Q, _KP[0], _KP[0], _PT, _KL), {}, "k_pages must have rank 4"),
    ((_Q, _KP, _KP[:, :2], _PT, _KL), {}, "v_pages must have the shape"),
    ((_Q, _KP[..., :8], _KP[..., :8], _PT, _KL), {}, "head_dim"),
    ((_Q[:, :3], _KP, _KP, _PT, _KL), {}, "q_heads"),
    ((_Q, _KP.astype(jnp.bfloat16), _KP.astype(jnp.bfloat16), _PT, _KL), {}, "dtype"),
    ((_Q, _KP, _KP, _PT[:2], _KL), {}, "page_table"),
    ((_Q, _KP, _KP, _PT[0], _KL), {}, "page_table must have rank 2"),
    ((_Q, _KP, _KP, _PT.astype(jnp.float32), _KL), {}, "page_table must be an integer"),
    ((_Q, _KP, _KP, _PT, _KL[:2]), {}, "kv_lens"),
    ((_Q, _KP, _KP, _PT, _KL.astype(jnp.float32)), {}, "kv_lens must be an integer"),
    ((_Q, _KP, _KP, _PT, _KL), dict(num_splits=0), "num_splits"),
    ((_Q, _KP, _KP, _PT, _KL), dict(sliding_window=-2), "sliding_window"),
    ((_Q, _KP, _KP, _PT, _KL), dict(logits_soft_cap=0.0), "logits_soft_cap"),
], ids=["q_rank", "k_rank", "v_shape", "head_dim", "heads", "dtype", "pt_batch", "pt_rank", "pt_dtype",
        "kv_lens_shape", "kv_lens_dtype", "splits", "window", "soft_cap"])
@pytest.mark.parametrize("impl", list(api.IMPLEMENTATIONS))
def test_paged_bad_inputs(args, kw, match, impl):
  with pytest.raises(ValueError, match=match):
    pallas_kernels.paged_attention(*args, implementation=impl, interpret=True, **kw)


@pytest.mark.parametrize("args,match", [
    ((_QR[0], _KP, _KP, _PTR, _KLR, _CU, 2), "q must have rank 3"),
    ((_QR[:, :3], _KP, _KP, _PTR, _KLR, _CU, 2), "q_heads"),
    ((_QR.astype(jnp.bfloat16), _KP, _KP, _PTR, _KLR, _CU, 2), "dtype"),
    ((_QR, _KP, _KP, _PTR, _KLR[:3], _CU, 2), "kv_lens"),
    ((_QR, _KP, _KP, _PTR, _KLR, _CU[:4], 2), "cu_q_lens"),
    ((_QR, _KP, _KP, _PTR, _KLR, _CU.astype(jnp.float32), 2), "cu_q_lens must be an integer"),
    ((_QR, _KP, _KP, _PTR[:, None], _KLR, _CU, 2), "page_table must have rank 2"),
    ((_QR, _KP, _KP, _PTR, _KLR, _CU, 2.0), "num_seqs"),
    ((_QR, _KP, _KP, _PTR, _KLR, _CU, jnp.zeros((2,), jnp.int32)), "num_seqs"),
], ids=["q_rank", "heads", "dtype", "kv_lens", "cu_shape", "cu_dtype", "pt_rank", "num_seqs_float",
        "num_seqs_shape"])
@pytest.mark.parametrize("impl", list(api.IMPLEMENTATIONS))
def test_ragged_bad_inputs(args, match, impl):
  with pytest.raises(ValueError, match=match):
    pallas_kernels.ragged_paged_attention(*args, implementation=impl, interpret=True)


# ------------------------------------------------------------------------------- quantized pools (int8/fp8)
# k/v pages hold random int8 / float8_e4m3fn codes with random float32 scales (per token [P, ps, hkv, 1] or
# per page and channel [P, 1, hkv, d]); every scale of an invisible slot (per token) or of a page with no
# visible slot (per channel) is NaN, so a kernel that dequantizes and uses one fails. Each implementation runs
# on the quantized pool and is compared with the reference on the same pool (which dequantizes in float32);
# the reference on the quantized pool equals the reference on the float32 pool of dequantized values exactly.
# Tolerances: those of the query dtype (the kernels cast the dequantized tile to q's dtype before the dot).

QUANT_CASES = [  # (ragged or paged case, codes dtype, key scales, value scales)
    (RAGGED_CASES[1], "int8", "channel", "token"),  # mixed prefill/decode, GQA 4, window, soft cap
    (PAGED_CASES[3], "float8_e4m3fn", "token", "token"),  # decode, bf16, GQA 2, page 8, window
]


def quantize_pool(pages, dtype: str, kind: str, seed: int):
  """Random codes of `dtype` and random scales of `kind` for a (NaN-poisoned) pool of pages' shape."""
  rng = np.random.default_rng(seed)
  vis = ~np.isnan(np.asarray(pages, np.float32)[..., 0, 0])  # [P, ps]: slots some query sees
  n, ps, hkv, d = pages.shape
  if dtype == "int8":
    codes = jnp.asarray(rng.integers(-127, 128, (n, ps, hkv, d)).astype(np.int8))
  else:
    codes = jnp.asarray((rng.standard_normal((n, ps, hkv, d)) * 60).astype(np.float32)).astype(jnp.float8_e4m3fn)
  if kind == "token":
    scales = rng.uniform(0.002, 0.05, (n, ps, hkv, 1)).astype(np.float32)
    scales[~vis] = np.nan
  else:
    scales = rng.uniform(0.002, 0.05, (n, 1, hkv, d)).astype(np.float32)
    scales[~vis.any(1)] = np.nan
  return codes, jnp.asarray(scales)


def quant_args(case, dtype, k_kind, v_kind):
  """(args with quantized pools in place of the float ones, dict(k_scales, v_scales), kernel kwargs)."""
  if isinstance(case, Paged):
    args, _, _ = make_paged(case)
    kw = paged_kwargs(case)
  else:
    args, _ = make_step(case)
    kw = ragged_kwargs(case)
  kq, ks = quantize_pool(args[1], dtype, k_kind, 1)
  vq, vs = quantize_pool(args[2], dtype, v_kind, 2)
  return (args[0], kq, vq, *args[3:]), dict(k_scales=ks, v_scales=vs), kw


def _qid(x):
  return x.name if isinstance(x, (Ragged, Paged)) else str(x)


@functools.lru_cache(maxsize=None)
def _quant_reference(qcase):
  args, scales, kw = quant_args(*qcase)
  fn = reference.paged_attention if isinstance(qcase[0], Paged) else reference.ragged_paged_attention
  return jax.jit(functools.partial(fn, **scales, **kw))(*args)


@pytest.mark.parametrize("qcase", QUANT_CASES, ids=lambda c: f"{c[0].name}-{c[1]}-k{c[2]}-v{c[3]}")
def test_quantized_reference_is_reference_on_dequantized_pool(qcase):
  args, scales, kw = quant_args(*qcase)
  real = lambda codes, s: (codes.astype(jnp.float32) * s).astype(args[0].dtype)  # noqa: E731
  fargs = (args[0], real(args[1], scales["k_scales"]), real(args[2], scales["v_scales"]), *args[3:])
  fn = reference.paged_attention if isinstance(qcase[0], Paged) else reference.ragged_paged_attention
  expected = jax.jit(functools.partial(fn, **kw))(*fargs)
  tol = 0.0 if args[0].dtype == jnp.float32 else TOL[qcase[0].dtype][0]  # bf16: dequantized values rounded
  assert_close(_quant_reference(qcase), expected, tol, "out")


@pytest.mark.parametrize("qcase,impl", [slow_when(i == "pallas_tpu", c, i) for c in QUANT_CASES
                                        for i in ("xla", "pallas_gpu", "pallas_tpu")],
                         ids=lambda x: x if isinstance(x, str) else f"{x[0].name}-{x[1]}-k{x[2]}-v{x[3]}")
def test_quantized_matches_reference(qcase, impl):
  args, scales, kw = quant_args(*qcase)
  table = PAGED_IMPLS if isinstance(qcase[0], Paged) else RAGGED_IMPLS
  o = jax.jit(functools.partial(table[impl], **scales, **kw))(*args)
  assert o.dtype == qcase[0].dtype and o.shape == args[0].shape
  assert_close(o, _quant_reference(qcase), TOL[qcase[0].dtype][0], "out")


@pytest.mark.parametrize("k_kind", ["channel", "token"])
@pytest.mark.parametrize("platform,module,marker", [("cuda", gpu, "triton"), ("tpu", tpu, "tpu_custom_call")])
def test_quantized_pallas_lowers_for_hardware(platform, module, marker, k_kind):
  """int8 pages with per-channel or per-token key scales (per-token value scales), ragged, lowered at
  realistic sizes (head_dim 128, page 16, GQA 4) for the real backend without one."""
  kp = jnp.ones((64, 16, 2, 128), jnp.int8)
  ks = jnp.ones((64, 1, 2, 128) if k_kind == "channel" else (64, 16, 2, 1), jnp.float32)
  vs = jnp.ones((64, 16, 2, 1), jnp.float32)
  args = (jnp.ones((32, 8, 128), jnp.bfloat16), kp, kp, jnp.zeros((4, 16), jnp.int32), jnp.ones((4,), jnp.int32),
          jnp.zeros((5,), jnp.int32), jnp.int32(3))
  fn = functools.partial(module.ragged_paged_attention, sliding_window=64, k_scales=ks, v_scales=vs)
  assert marker in jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def test_quantized_bad_scales():
  args, scales, _ = quant_args(*QUANT_CASES[0])
  with pytest.raises(ValueError, match="k_scales and v_scales must be given together"):
    pallas_kernels.ragged_paged_attention(*args, k_scales=scales["k_scales"])
  with pytest.raises(ValueError, match="k_scales must have shape"):
    pallas_kernels.ragged_paged_attention(*args, k_scales=scales["k_scales"][:, :, :, :3], v_scales=scales["v_scales"])
  with pytest.raises(ValueError, match="v_scales must be float32"):
    pallas_kernels.ragged_paged_attention(*args, k_scales=scales["k_scales"],
                                          v_scales=scales["v_scales"].astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="k_pages with scales must be one of"):
    pallas_kernels.ragged_paged_attention(args[0], args[1].astype(jnp.int16), *args[2:], **scales)
