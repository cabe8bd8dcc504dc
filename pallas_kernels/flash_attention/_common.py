"""Shared pieces of the blockwise implementations: input validation, defaults, padding, the static mask
parameters, the in-tile score/mask math and the custom_vjp skeleton (forward saves lse; backward recomputes)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import validation as V
from pallas_kernels.flash_attention import tiles
from pallas_kernels.flash_attention.masks import default_positions, visible
from pallas_kernels.shapes import cdiv, pad_axis, round_up  # noqa: F401  (re-exported for the kernels)

# Segment ids given to padding tokens. Padded keys get KV_PAD_SEGMENT and padded queries Q_PAD_SEGMENT, two
# different values, so a padded key is never visible to any query (user segment ids must not use these two
# reserved values, the two most negative int32 numbers).
KV_PAD_SEGMENT = int(np.iinfo(np.int32).min)
Q_PAD_SEGMENT = KV_PAD_SEGMENT + 1


@dataclasses.dataclass(frozen=True)
class MaskParams:
  """Static (hashable) description of the score transform and mask, shared by kernels and tests."""
  causal: bool
  sm_scale: float
  sliding_window: int | None
  logits_soft_cap: float | None
  has_segments: bool


# ----------------------------------------------------------------------------------------------- validation


def validate(q, k, v, *, causal, sm_scale, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
             sliding_window, logits_soft_cap):
  """Raises ValueError naming the offending argument. Shapes are static, so this also works under jit."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    V.check_array(x, name, 4, "[batch, seq, heads, head_dim]", floating=True)
  V.check_qkv(q, k, v)
  batch, q_len, q_heads, head_dim = q.shape
  if k.shape[0] != batch:
    raise ValueError(f"k batch {k.shape[0]} does not match q batch {batch}")
  kv_len = k.shape[1]
  if q_len == 0 or kv_len == 0:
    raise ValueError(f"empty attention: q shape {tuple(q.shape)}, k shape {tuple(k.shape)}")
  V.check_int_array(q_positions, "q_positions", (batch, q_len), "([batch, length])")
  V.check_int_array(kv_positions, "kv_positions", (batch, kv_len), "([batch, length])")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together (both or neither)")
  V.check_int_array(q_segment_ids, "q_segment_ids", (batch, q_len), "([batch, length])")
  V.check_int_array(kv_segment_ids, "kv_segment_ids", (batch, kv_len), "([batch, length])")
  if not isinstance(causal, (bool, np.bool_)):
    raise ValueError(f"causal must be a Python bool, got {causal!r}")
  V.check_options(sm_scale=sm_scale, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)


check_block = V.check_block


@dataclasses.dataclass
class Inputs:
  """Validated inputs with defaults filled in (positions always int32 arrays; segments None when not given)."""
  q: jax.Array
  k: jax.Array
  v: jax.Array
  q_positions: jax.Array
  kv_positions: jax.Array
  q_segment_ids: jax.Array | None
  kv_segment_ids: jax.Array | None
  params: MaskParams

  @property
  def group(self) -> int:
    return self.q.shape[2] // self.k.shape[2]


def prepare(q, k, v, *, causal, sm_scale, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
            sliding_window, logits_soft_cap) -> Inputs:
  validate(q, k, v, causal=causal, sm_scale=sm_scale, q_positions=q_positions, kv_positions=kv_positions,
           q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, sliding_window=sliding_window,
           logits_soft_cap=logits_soft_cap)
  batch, q_len, _, head_dim = q.shape
  kv_len = k.shape[1]
  qp = default_positions(batch, q_len) if q_positions is None else jnp.asarray(q_positions, jnp.int32)
  kp = default_positions(batch, kv_len) if kv_positions is None else jnp.asarray(kv_positions, jnp.int32)
  qs = None if q_segment_ids is None else jnp.asarray(q_segment_ids, jnp.int32)
  ks = None if kv_segment_ids is None else jnp.asarray(kv_segment_ids, jnp.int32)
  params = MaskParams(causal=bool(causal), sm_scale=float(head_dim ** -0.5 if sm_scale is None else sm_scale),
                      sliding_window=None if sliding_window is None else int(sliding_window),
                      logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
                      has_segments=qs is not None)
  return Inputs(q, k, v, qp, kp, qs, ks, params)


# ------------------------------------------------------------------------------------------------- padding


@dataclasses.dataclass
class Tokens:
  """Positions and segment ids padded to the kernel lengths (segments None when neither given nor needed)."""
  q_positions: jax.Array
  kv_positions: jax.Array
  q_segment_ids: jax.Array | None
  kv_segment_ids: jax.Array | None


def pad_tokens(inp: Inputs, q_pad_len: int, kv_pad_len: int) -> tuple[Tokens, MaskParams]:
  """Pads positions/segments. Padded keys get a segment id no query has, so they are never visible; when the
  caller gave no segments but keys need padding, all-zero segments are made up for that purpose."""
  q_len, kv_len = inp.q.shape[1], inp.k.shape[1]
  qs, ks = inp.q_segment_ids, inp.kv_segment_ids
  params = inp.params
  if qs is None and kv_pad_len != kv_len:
    qs = jnp.zeros_like(inp.q_positions)
    ks = jnp.zeros_like(inp.kv_positions)
    params = dataclasses.replace(params, has_segments=True)
  tok = Tokens(
      q_positions=pad_axis(inp.q_positions, 1, q_pad_len, 0),
      kv_positions=pad_axis(inp.kv_positions, 1, kv_pad_len, 0),
      q_segment_ids=None if qs is None else pad_axis(qs, 1, q_pad_len, Q_PAD_SEGMENT),
      kv_segment_ids=None if ks is None else pad_axis(ks, 1, kv_pad_len, KV_PAD_SEGMENT))
  return tok, params


def visibility(inp: Inputs, block_q: int, block_k: int, num_q_blocks: int, num_kv_blocks: int):
  """tile_visibility on the unpadded tokens, padded with invisible tiles up to the kernel's block counts."""
  vis = tiles.tile_visibility(inp.q_positions, inp.kv_positions, inp.q_segment_ids, inp.kv_segment_ids,
                              causal=inp.params.causal, sliding_window=inp.params.sliding_window,
                              block_q=block_q, block_k=block_k)
  return jnp.pad(vis, ((0, 0), (0, num_q_blocks - vis.shape[1]), (0, num_kv_blocks - vis.shape[2])))


# ---------------------------------------------------------------------------------------- in-tile math
# These helpers only use jnp/lax ops that Pallas lowers on every backend (Triton, Mosaic TPU, interpret).


def soft_cap(s, params: MaskParams):
  """Returns (capped scores, tanh values or None); the tanh is reused by the backward pass."""
  if params.logits_soft_cap is None:
    return s, None
  t = jnp.tanh(s * (1.0 / params.logits_soft_cap))
  return params.logits_soft_cap * t, t


def soft_cap_grad(ds, t, params: MaskParams):
  """d(cap * tanh(s / cap)) / ds = 1 - tanh^2."""
  if params.logits_soft_cap is None:
    return ds
  return ds * (1.0 - t * t)


def tile_mask(q_pos, kv_pos, q_seg, kv_seg, params: MaskParams):
  """Broadcasting visibility inside a tile (segments ignored unless params.has_segments)."""
  if params.has_segments:
    return visible(q_pos, kv_pos, q_seg, kv_seg, causal=params.causal, sliding_window=params.sliding_window)
  ok = None
  if params.causal:
    ok = kv_pos <= q_pos
  if params.sliding_window is not None:
    w = q_pos - kv_pos < params.sliding_window
    ok = w if ok is None else ok & w
  return ok


def needs_mask(params: MaskParams) -> bool:
  return params.causal or params.sliding_window is not None or params.has_segments


def safe_lse(lse):
  """lse with -inf (row with no visible key) replaced by +inf, so exp(s - lse) is exactly 0 there."""
  return jnp.where(lse == -jnp.inf, jnp.inf, lse)


# -------------------------------------------------------------------------------------------- custom_vjp


def make_core(fwd, bwd):
  """core(static, q, k, v, aux) -> (o, lse) with a custom VJP: fwd(static, q, k, v, aux) -> (o, lse);
  bwd(static, q, k, v, aux, o, lse, do, dlse) -> (dq, dk, dv). `aux` holds integer arrays (positions,
  segments, tile tables) that get no cotangent; `static` must be hashable."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def core(static, q, k, v, aux):
    return fwd(static, q, k, v, aux)

  def core_fwd(static, q, k, v, aux):
    o, lse = fwd(static, q, k, v, aux)
    return (o, lse), (q, k, v, aux, o, lse)

  def core_bwd(static, res, cts):
    q, k, v, aux, o, lse = res
    do, dlse = cts
    dq, dk, dv = bwd(static, q, k, v, aux, o, lse, do, dlse)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None

  core.defvjp(core_fwd, core_bwd)
  return core


def backward_delta(o, do, dlse):
  """FA2's delta = rowsum(dO * O), minus the lse cotangent (d lse / d s = P, so it folds into the same term).
  o, do [..., d]; dlse [...] -> float32 [...]."""
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  return delta - dlse.astype(jnp.float32)


def flops(batch, q_len, kv_len, q_heads, head_dim, *, causal: bool, with_backward: bool = False) -> float:
  """Matmul FLOPs of attention: forward 2 matmuls (QK^T, PV); forward+backward counted as 3.5x forward (the
  FlashAttention-2 convention, backward = 2.5x forward); causal counted as half."""
  f = 4.0 * batch * q_heads * q_len * kv_len * head_dim
  if with_backward:
    f *= 3.5
  return f / 2 if causal else f
