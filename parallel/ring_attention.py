"""Ring attention (Liu et al.) over one mesh axis, with a custom VJP that rotates dK/dV around the ring.

Every device keeps its own queries and passes its key/value block (with the block's token positions and
segment ids) to the next device on the ring, `axis_size` times in all. At each step it runs
`pallas_kernels.flash_attention(..., return_lse=True)` on the block it holds and merges the partial result into
a running (output, log-sum-exp) pair. Masks follow the token positions, never the array index, so the same code
serves the contiguous layout of the original paper and the striped / zigzag layouts of `parallel.layouts`
(permute tokens and positions once at the model input, undo it on the output).

Axis types: the body runs in a `jax.shard_map` that is Manual over every mesh axis (so the Pallas kernels inside
never meet the automatic partitioner). The mesh handed in may have Auto axes (jaxinfer's own meshes, see
`parallel.mesh`) or Explicit axes (`jax.make_mesh`'s default since JAX 0.10). Batch and heads keep the mesh axes
the inputs already use: read from the types (Explicit), from committed arrays (eager), or, for traced arrays on
Auto axes where the layout is unknown, DEFAULT_BATCH_AXES / DEFAULT_HEAD_AXES (overridable with batch_axes= /
head_axes=). With Explicit axes the inputs are `reshard`-ed to that layout; with Auto axes shard_map moves them.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import flash_attention
from pallas_kernels.flash_attention.tiles import tile_visibility
from pallas_kernels.lse import merge_pair

__all__ = ["ring_attention", "block_may_be_visible", "DEFAULT_BATCH_AXES", "DEFAULT_HEAD_AXES"]

# Where batch and heads are assumed to live when the inputs' layout cannot be read (traced arrays on Auto axes,
# i.e. inside jit on a jaxinfer mesh): the mesh axes of jaxinfer's default logical rules, kept when present in
# the mesh with size > 1 and dividing the dimension. Pass batch_axes= / head_axes= to say otherwise.
DEFAULT_BATCH_AXES = ("data", "fsdp")
DEFAULT_HEAD_AXES = ("tensor",)


# ----------------------------------------------------------------------------------------------------------------
# Block skipping.


def block_may_be_visible(q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None, *, causal: bool,
                         sliding_window=None):
  """Scalar bool: may any query of this device's block see any key of the block it holds now?

  The kernel's own tile test (`tiles.tile_visibility`, min/max of positions and segment ranges) with one tile
  spanning each whole block, so the ring skips exactly what the kernel would. Conservative: True whenever some
  pair might be visible, so skipping on False never changes the result. Arrays are [batch, len]; the answer
  covers the whole batch since one kernel call serves all of it.
  """
  vis = tile_visibility(q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal=causal,
                        sliding_window=sliding_window, block_q=q_positions.shape[1],
                        block_k=kv_positions.shape[1])
  return jnp.any(vis)


# ----------------------------------------------------------------------------------------------------------------
# Per-device bodies (run inside shard_map).


def _merge(o_acc, lse_acc, o_t, lse_t):
  """Log-sum-exp merge (pallas_kernels.lse) of the running result with this step's; o [b, q, h, d] float32,
  lse [b, h, q] float32 (-inf rows: nothing visible yet)."""
  o, lse = merge_pair(o_acc, jnp.swapaxes(lse_acc, 1, 2), o_t, jnp.swapaxes(lse_t, 1, 2))
  return o, jnp.swapaxes(lse, 1, 2)


def _rotate(x, axis_name, n):
  return lax.ppermute(x, axis_name, perm=[(i, (i + 1) % n) for i in range(n)])


def _local_positions(pos, batch, length, axis_name):
  if pos is not None:
    return pos
  start = lax.axis_index(axis_name) * length
  return jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))


def _ring_fwd_local(q, k, v, qp, kp, qs, ks, *, cfg):
  """Per-device forward. Returns (out [b,q,h,d] in q.dtype, lse [b,h,q] float32)."""
  n, axis_name = cfg["axis_size"], cfg["axis_name"]
  b, sq, hq, _ = q.shape
  qp = _local_positions(qp, b, sq, axis_name)
  kp = _local_positions(kp, b, k.shape[1], axis_name)
  attn = functools.partial(flash_attention, causal=cfg["causal"], sm_scale=cfg["sm_scale"],
                           sliding_window=cfg["sliding_window"], logits_soft_cap=cfg["logits_soft_cap"],
                           implementation=cfg["implementation"], return_lse=True)

  def step(acc, blk):
    kb, vb, kpb, ksb = blk

    def compute(acc):
      o_t, lse_t = attn(q, kb, vb, q_positions=qp, kv_positions=kpb, q_segment_ids=qs, kv_segment_ids=ksb)
      return _merge(*acc, o_t, lse_t.astype(jnp.float32))

    visible = block_may_be_visible(qp, kpb, qs, ksb, causal=cfg["causal"], sliding_window=cfg["sliding_window"])
    return lax.cond(visible, compute, lambda acc: acc, acc)

  acc = (jnp.zeros(q.shape, jnp.float32), jnp.full((b, hq, sq), -jnp.inf, jnp.float32))
  blk = (k, v, kp, ks)

  def body(carry, _):
    blk, acc = carry
    nxt = jax.tree.map(lambda x: _rotate(x, axis_name, n), blk)  # send first, so it overlaps the compute
    return (nxt, step(acc, blk)), None

  (blk, acc), _ = lax.scan(body, (blk, acc), None, length=n - 1)
  o, lse = step(acc, blk)
  return o.astype(q.dtype), lse


def _ring_bwd_local(q, k, v, qp, kp, qs, ks, o, lse, do, *, cfg):
  """Per-device backward: dq stays, (dk, dv) travel with (k, v) and end on their owner after n hops."""
  n, axis_name = cfg["axis_size"], cfg["axis_name"]
  b, sq, _, _ = q.shape
  qp = _local_positions(qp, b, sq, axis_name)
  kp = _local_positions(kp, b, k.shape[1], axis_name)
  do32 = do.astype(jnp.float32)
  o32 = o.astype(jnp.float32)

  def block_grads(blk):
    kb, vb, kpb, ksb = blk

    def f(q_, k_, v_):
      return flash_attention(q_, k_, v_, causal=cfg["causal"], sm_scale=cfg["sm_scale"], q_positions=qp,
                             kv_positions=kpb, q_segment_ids=qs, kv_segment_ids=ksb,
                             sliding_window=cfg["sliding_window"], logits_soft_cap=cfg["logits_soft_cap"],
                             implementation=cfg["implementation"], return_lse=True)

    (o_t, lse_t), vjp = jax.vjp(f, q, kb, vb)
    lse_t = lse_t.astype(jnp.float32)
    # out = sum_t w_t out_t with w_t = exp(lse_t - lse): the block sees cotangent w_t * do on out_t, and
    # w_t * <do, out_t - out> on lse_t (the softmax-renormalisation term). Rows it cannot see get w_t = 0.
    w = jnp.where(jnp.isneginf(lse_t), 0.0, jnp.exp(lse_t - jnp.where(jnp.isneginf(lse), 0.0, lse)))
    do_t = (do32 * jnp.swapaxes(w, 1, 2)[..., None]).astype(o_t.dtype)
    dlse_t = w * jnp.einsum("bqhd,bqhd->bhq", do32, o_t.astype(jnp.float32) - o32)
    dq, dk, dv = vjp((do_t, dlse_t.astype(lse_t.dtype)))
    return dq.astype(jnp.float32), dk.astype(jnp.float32), dv.astype(jnp.float32)

  def step(dq, dkv, blk):
    kb, vb, kpb, ksb = blk
    visible = block_may_be_visible(qp, kpb, qs, ksb, causal=cfg["causal"], sliding_window=cfg["sliding_window"])
    zeros = lambda blk: (jnp.zeros(q.shape, jnp.float32), jnp.zeros(kb.shape, jnp.float32),
                         jnp.zeros(vb.shape, jnp.float32))
    g_q, g_k, g_v = lax.cond(visible, block_grads, zeros, blk)
    return dq + g_q, (dkv[0] + g_k, dkv[1] + g_v)

  dq = jnp.zeros(q.shape, jnp.float32)
  dkv = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  blk = (k, v, kp, ks)

  def body(carry, _):
    blk, dkv, dq = carry
    nxt = jax.tree.map(lambda x: _rotate(x, axis_name, n), blk)  # next K/V block, issued before the compute
    dq, dkv = step(dq, dkv, blk)
    dkv = jax.tree.map(lambda x: _rotate(x, axis_name, n), dkv)  # accumulated dK/dV follow their block
    return (nxt, dkv, dq), None

  (blk, dkv, dq), _ = lax.scan(body, (blk, dkv, dq), None, length=n - 1)
  dq, dkv = step(dq, dkv, blk)
  dk, dv = (_rotate(x, axis_name, n) for x in dkv) if n > 1 else dkv  # last hop: back to the owner
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Global wrapper: layout checks, shard_map, custom_vjp.


def _axes_of(entry) -> tuple:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _spec_entry(axes: tuple):
  return None if not axes else (axes[0] if len(axes) == 1 else tuple(axes))


def _layout_of(x) -> tuple[tuple, bool]:
  """(mesh axes of each dimension, known): read from x's type (Explicit axes) or its committed NamedSharding.

  known is False for a traced array on Auto axes (inside jit the layout is not in the type).
  """
  spec, known = (), False
  try:
    sharding = jax.typeof(x).sharding
    if any(t == AxisType.Explicit for t in sharding.mesh.axis_types):
      spec, known = tuple(sharding.spec), True
  except Exception:  # pragma: no cover - values without a sharding in their type
    pass
  if not known and not isinstance(x, jax.core.Tracer) and isinstance(getattr(x, "sharding", None), NamedSharding):
    spec, known = tuple(x.sharding.spec), True
  return spec + (None,) * (x.ndim - len(spec)), known


def _current_spec(x) -> tuple:
  return _layout_of(x)[0]


def _default_axes(mesh, candidates, sizes, axis_name) -> tuple:
  """The candidate mesh axes (size > 1, not the ring axis) whose running product divides every size."""
  axes, prod = [], 1
  for a in candidates:
    if a in mesh.axis_names and a != axis_name and mesh.shape[a] > 1:
      if all(s % (prod * mesh.shape[a]) == 0 for s in sizes):
        axes.append(a)
        prod *= mesh.shape[a]
  return tuple(axes)


def _size(mesh, axes) -> int:
  size = 1
  for a in axes:
    size *= mesh.shape[a]
  return size


def _check_array(name, x, ndim):
  if x is None:
    return
  if getattr(x, "ndim", None) != ndim:
    raise ValueError(f"{name} must have {ndim} dimensions, got shape {getattr(x, 'shape', None)}")


def ring_attention(q, k, v, *, mesh, axis_name: str = "sequence", causal: bool = True, q_positions=None,
                   kv_positions=None, q_segment_ids=None, kv_segment_ids=None, sliding_window=None,
                   implementation=None, sm_scale=None, logits_soft_cap=None, batch_axes=None, head_axes=None):
  """Exact attention over a sequence sharded along mesh axis `axis_name`, computed as a ring.

  Args:
    q: [batch, q_len, q_heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim] (GQA/MQA when kv_heads <
      q_heads). Global arrays whose seq dimension is sharded (or will be sharded) over `axis_name`; batch may be
      sharded over other mesh axes and heads over a tensor axis: those shardings are kept, read from the
      arrays' types (Explicit axes) or their committed sharding, or given by `batch_axes` / `head_axes`
      (default for traced arrays on Auto axes: DEFAULT_BATCH_AXES / DEFAULT_HEAD_AXES where they divide).
    mesh: the `jax.sharding.Mesh` (Explicit or Auto axes) the arrays are laid out on.
    axis_name: the mesh axis of the ring.
    causal, q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window, sm_scale,
      logits_soft_cap: mask and score options with the semantics of `pallas_kernels.flash_attention`;
      positions and segment ids are [batch, len] int arrays laid out like the tokens (after any striped or
      zigzag permutation); positions default to 0..len-1.
    implementation: passed to `flash_attention` for every per-block call.
    batch_axes, head_axes: optional mesh axes (a name or a tuple) of the batch / heads dimension, overriding
      what the inputs say (useful with Auto axes inside jit, where the layout is not in the types); () means
      replicated. kv heads are split like q heads, so kv_heads must divide by their size too.

  Returns:
    [batch, q_len, q_heads, head_dim] in q.dtype, sharded like q (seq over `axis_name`).

  Raises:
    ValueError naming the value: `axis_name` not in the mesh; a length not divisible by the axis size; seq
    sharded over another axis; mismatched shapes of q/k/v/positions/segment ids.
  """
  if axis_name not in mesh.axis_names:
    raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh (axes: {tuple(mesh.axis_names)})")
  n = mesh.shape[axis_name]
  for name, x in (("q", q), ("k", k), ("v", v)):
    _check_array(name, x, 4)
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got k {k.shape} and v {v.shape}")
  batch, q_len, q_heads, head_dim = q.shape
  _, kv_len, kv_heads, _ = k.shape
  if k.shape[0] != batch or k.shape[3] != head_dim:
    raise ValueError(f"q {q.shape} and k/v {k.shape} must agree on batch and head_dim")
  if q_heads % kv_heads:
    raise ValueError(f"q_heads={q_heads} is not a multiple of kv_heads={kv_heads}")
  for name, length in (("q sequence length", q_len), ("kv sequence length", kv_len)):
    if length % n:
      raise ValueError(f"{name} {length} is not divisible by the size {n} of mesh axis {axis_name!r}")
  for name, x, length in (("q_positions", q_positions, q_len), ("kv_positions", kv_positions, kv_len),
                          ("q_segment_ids", q_segment_ids, q_len), ("kv_segment_ids", kv_segment_ids, kv_len)):
    _check_array(name, x, 2)
    if x is not None and tuple(x.shape) != (batch, length):
      raise ValueError(f"{name} has shape {tuple(x.shape)}, expected (batch, seq) = {(batch, length)}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")

  # Layout: seq over axis_name; batch / heads keep the axes they already use; head_dim is never split.
  for name, x in (("q", q), ("k", k), ("v", v), ("q_positions", q_positions), ("kv_positions", kv_positions),
                  ("q_segment_ids", q_segment_ids), ("kv_segment_ids", kv_segment_ids)):
    if x is None:
      continue
    seq_axes = _axes_of(_current_spec(x)[1])
    if seq_axes and seq_axes != (axis_name,):
      raise ValueError(f"{name} is sharded along its sequence dimension over mesh axes {seq_axes}; ring "
                       f"attention needs it sharded over {axis_name!r} only")
  spec_q, known = _layout_of(q)
  if batch_axes is not None:
    b_axes = _axes_of(batch_axes)
  elif known:
    b_axes = _axes_of(spec_q[0])
  else:  # Auto axes under jit: jaxinfer's rules (parallel.sharding.DEFAULT_RULES) put batch on data, fsdp
    b_axes = _default_axes(mesh, DEFAULT_BATCH_AXES, (batch,), axis_name)
  if head_axes is not None:
    h_axes = _axes_of(head_axes)
  elif known:
    h_axes = _axes_of(spec_q[2])
  else:  # ... and heads / kv_heads on tensor
    h_axes = _default_axes(mesh, DEFAULT_HEAD_AXES, (q_heads, kv_heads), axis_name)
  for what, axes, size in (("batch", b_axes, batch), ("q_heads", h_axes, q_heads), ("kv_heads", h_axes, kv_heads)):
    bad = [a for a in axes if a not in mesh.axis_names or a == axis_name]
    if bad:
      raise ValueError(f"{what} cannot be sharded over mesh axes {bad} (ring axis {axis_name!r}, mesh axes "
                       f"{tuple(mesh.axis_names)})")
    if size % _size(mesh, axes):
      raise ValueError(f"{what}={size} is not divisible by the size {_size(mesh, axes)} of mesh axes {axes}")
  if set(b_axes) & set(h_axes):
    raise ValueError(f"batch axes {b_axes} and head axes {h_axes} overlap")

  b_e, h_e = _spec_entry(b_axes), _spec_entry(h_axes)
  spec_x = P(b_e, axis_name, h_e, None)
  spec_tok = P(b_e, axis_name)
  spec_lse = P(b_e, h_e, axis_name)

  explicit = any(t == AxisType.Explicit for t in mesh.axis_types)

  def place(x, spec):
    if x is None or not explicit:
      return x  # Auto axes: shard_map moves the data to in_specs itself.
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))  # Explicit axes: types must match in_specs

  q, k, v = (place(x, spec_x) for x in (q, k, v))
  qp, kp, qs, ks = (place(x, spec_tok) for x in (q_positions, kv_positions, q_segment_ids, kv_segment_ids))

  cfg = dict(axis_size=n, axis_name=axis_name, causal=bool(causal), sm_scale=sm_scale,
             sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, implementation=implementation)
  fn = _make_ring(mesh, spec_x, spec_lse, spec_tok, _freeze(cfg))
  return fn(q, k, v, qp, kp, qs, ks)


def _freeze(cfg: dict) -> tuple:
  return tuple(sorted(cfg.items()))


@functools.lru_cache(maxsize=64)
def _make_ring(mesh, spec_x, spec_lse, spec_tok, frozen_cfg):
  cfg: dict[str, Any] = dict(frozen_cfg)
  in_specs_fwd = (spec_x, spec_x, spec_x) + (spec_tok,) * 4  # absent (None) positions/segments match any spec
  # jit: eager calls then compile once per shape instead of running the shard_map body op by op (inside an
  # outer jit it is inlined).
  fwd_local = jax.jit(jax.shard_map(functools.partial(_ring_fwd_local, cfg=cfg), mesh=mesh,
                                    in_specs=in_specs_fwd, out_specs=(spec_x, spec_lse), check_vma=False))
  bwd_local = jax.jit(jax.shard_map(functools.partial(_ring_bwd_local, cfg=cfg), mesh=mesh,
                                    in_specs=in_specs_fwd + (spec_x, spec_lse, spec_x),
                                    out_specs=(spec_x, spec_x, spec_x), check_vma=False))

  @jax.custom_vjp
  def ring(q, k, v, qp, kp, qs, ks):
    return fwd_local(q, k, v, qp, kp, qs, ks)[0]

  def ring_fwd(q, k, v, qp, kp, qs, ks):
    o, lse = fwd_local(q, k, v, qp, kp, qs, ks)
    return o, (q, k, v, qp, kp, qs, ks, o, lse)

  def ring_bwd(res, do):
    q, k, v, qp, kp, qs, ks, o, lse = res
    dq, dk, dv = bwd_local(q, k, v, qp, kp, qs, ks, o, lse, do)
    return dq, dk, dv, None, None, None, None

  ring.defvjp(ring_fwd, ring_bwd)
  return ring
