"""Device programs of the compacting policies: choose the kept slots of one request per (layer, kv head)
and move them (k, v, their scales in a quantized pool, slot positions, scores) into fresh pages; H2O's
one-slot eviction per decode step.

Selections are pure jnp functions of one layer's score row [L, H] and slot positions [L, H] (logical
order), so the tests can compare them with plain-NumPy references written from the papers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfer.engine import kv_quant
from jaxinfer.engine.kv_policies.attention import HEAD_AXIS


def topk_plus_recent(score, held, recent: int, keep: int):
  """[keep, H] ascending logical indices: the recent `recent` slots (logical held-recent..held-1) and the
  keep-recent highest `score` among the slots before them (score [L, H])."""
  width = score.shape[0]
  j = jnp.arange(width, dtype=jnp.int32)[:, None]
  candidate = j < held - recent
  _, top = jax.lax.top_k(jnp.where(candidate, score, -jnp.inf).T, keep - recent)  # [H, keep-recent]
  recent_idx = jnp.broadcast_to(held - recent + jnp.arange(recent, dtype=jnp.int32), (score.shape[1], recent))
  return jnp.sort(jnp.concatenate([top.astype(jnp.int32), recent_idx], axis=1), axis=1).T


def max_pool(score, valid, kernel: int):
  """Centred 1-D max pooling over logical slots of score [L, H], only over `valid` slots."""
  x = jnp.where(valid, score, -jnp.inf)
  half = kernel // 2
  padded = jnp.pad(x, ((half, half), (0, 0)), constant_values=-jnp.inf)
  return functools.reduce(jnp.maximum, [padded[i:i + x.shape[0]] for i in range(kernel)])


def snapkv_select(score, slot_pos, held, latest, *, window: int, kernel: int, keep: int):
  """SnapKV: prompt slots scored by the observation window's attention (score), max-pooled, top keep-window,
  plus the window itself."""
  del slot_pos, latest
  j = jnp.arange(score.shape[0], dtype=jnp.int32)[:, None]
  pooled = max_pool(score, j < held - window, kernel)
  return topk_plus_recent(pooled, held, window, keep)


def h2o_select(score, slot_pos, held, latest, *, window: int, keep: int):
  """H2O at the end of prefill: heavy hitters by accumulated mass plus the recent window."""
  del slot_pos, latest
  return topk_plus_recent(score, held, window, keep)


def live_select(score, slot_pos, held, latest, *, keep: int):
  """The slots still held (slot_pos >= 0), in logical order (H2O's periodic compaction)."""
  del score, latest
  j = jnp.arange(slot_pos.shape[0], dtype=jnp.int32)[:, None]
  live = (j < held) & (slot_pos >= 0)
  order = jnp.argsort(jnp.where(live, j, slot_pos.shape[0] + j), axis=0, stable=True)
  return order[:keep].astype(jnp.int32)


def h2o_victim(score, slot_pos, held, latest, window: int):
  """[H] logical slot each kv head evicts: the least accumulated mass among live slots older than the window."""
  j = jnp.arange(score.shape[0], dtype=jnp.int32)[:, None]
  old = (j < held) & (slot_pos >= 0) & (slot_pos <= latest - window)
  return jnp.argmin(jnp.where(old, score, jnp.inf), axis=0).astype(jnp.int32), old.any(axis=0)


def compact(pool, row, old_slots, new_slots, held, latest, *, select, keep: int):
  """For every layer: keep[i, h] = select(...) logical slots of the request's old pages; slot new_slots[i]
  head h becomes a copy of old slot old_slots[keep[i, h]] head h (k, v, position); the score row follows.
  On a pool split on kv heads (a sharded model) it runs per shard: every head's selection and moves are its
  own, so no shard reads another's pages."""
  return _compact(pool, row, old_slots, new_slots, held, latest, select=select, keep=keep, heads=pool_heads(pool))


def h2o_evict(pool, row, old_slots, held, latest, *, window: int):
  """One slot per (layer, kv head) leaves: its position becomes -1 for that head, its score 0 (per shard on
  a pool split on kv heads)."""
  return _h2o_evict(pool, row, old_slots, held, latest, window=window, heads=pool_heads(pool))


def pool_heads(pool):
  """(mesh, mesh axes) splitting the pool's kv heads (sharding.EngineSharding.pool_sharding), None when the
  pool is on one device or not split on heads."""
  sharding = getattr(pool.k[0], "sharding", None)
  if not isinstance(sharding, NamedSharding) or sharding.mesh.size == 1:
    return None
  spec = tuple(sharding.spec) + (None,) * 4
  return None if spec[2] is None else (sharding.mesh, spec[2])


def per_head_shard(heads, fn, split: dict, replicated: tuple):
  """fn(split, replicated) -> a dict like `split`; with heads (pool_heads), run per shard under shard_map with
  each array of `split` (a tuple per layer, named as in attention.HEAD_AXIS) split on its kv-head axis."""
  if heads is None:
    return fn(split, replicated)
  mesh, axes = heads
  specs = {name: P(*(None,) * HEAD_AXIS[name], axes) for name in split}
  return jax.shard_map(fn, mesh=mesh, in_specs=(specs, P()), out_specs=specs, check_vma=False)(split, replicated)


def _state_arrays(pool, with_pages: bool) -> dict:
  st = pool.policy
  split = dict(slot_pos=st.slot_pos, score=st.score)
  if with_pages:
    split.update(kp=pool.k, vp=pool.v)
    if pool.k_scales is not None:
      split.update(ks=pool.k_scales, vs=pool.v_scales)
  return split


def _with_arrays(pool, out: dict):
  quant = {} if "ks" not in out else dict(k_scales=out["ks"], v_scales=out["vs"])
  pages = {} if "kp" not in out else dict(k=out["kp"], v=out["vp"])
  return pool.replace(policy=pool.policy.replace(slot_pos=out["slot_pos"], score=out["score"]), **pages, **quant)


@functools.partial(jax.jit, static_argnames=("select", "keep", "heads"), donate_argnums=(0,))
def _compact(pool, row, old_slots, new_slots, held, latest, *, select, keep: int, heads):
  fn = lambda arrays, rep: _compact_layers(arrays, *rep, select=select, keep=keep)  # noqa: E731
  return _with_arrays(pool, per_head_shard(heads, fn, _state_arrays(pool, True),
                                           (row, old_slots, new_slots, held, latest)))


def _compact_layers(arrays, row, old_slots, new_slots, held, latest, *, select, keep: int) -> dict:
  out = {name: [] for name in arrays}
  quant = "ks" in arrays
  for layer in range(len(arrays["kp"])):
    kp, vp = arrays["kp"][layer], arrays["vp"][layer]
    shape = kp.shape
    hkv = shape[2]
    flat = (shape[0] * shape[1], hkv, shape[3])
    sp = arrays["slot_pos"][layer]
    sc = arrays["score"][layer]
    row_score = sc[row]
    row_pos = sp[old_slots]  # [L, H]
    idx = select(row_score, row_pos, held, latest)  # [keep, H]
    src = old_slots[idx]  # [keep, H] physical
    heads = jnp.arange(hkv)[None, :]
    if not quant:
      kf, vf = kp.reshape(flat), vp.reshape(flat)
      out["kp"].append(kf.at[new_slots].set(kf[src, heads]).reshape(shape))
      out["vp"].append(vf.at[new_slots].set(vf[src, heads]).reshape(shape))
    else:  # codes and scales move together (per-channel keys are requantized: kv_quant.move_slots)
      kq, ksc = kv_quant.move_slots(kp, arrays["ks"][layer], src, new_slots)
      vq, vsc = kv_quant.move_slots(vp, arrays["vs"][layer], src, new_slots)
      out["kp"].append(kq)
      out["vp"].append(vq)
      out["ks"].append(ksc)
      out["vs"].append(vsc)
    out["slot_pos"].append(sp.at[new_slots].set(sp[src, heads]))
    kept = jnp.zeros_like(row_score).at[:keep].set(jnp.take_along_axis(row_score, idx, axis=0))
    out["score"].append(sc.at[row].set(kept))
  return {name: tuple(v) for name, v in out.items()}


@functools.partial(jax.jit, static_argnames=("window", "heads"), donate_argnums=(0,))
def _h2o_evict(pool, row, old_slots, held, latest, *, window: int, heads):
  fn = lambda arrays, rep: _evict_layers(arrays, *rep, window=window)  # noqa: E731
  return _with_arrays(pool, per_head_shard(heads, fn, _state_arrays(pool, False), (row, old_slots, held, latest)))


def _evict_layers(arrays, row, old_slots, held, latest, *, window: int) -> dict:
  poss, scores = [], []
  for sp, sc in zip(arrays["slot_pos"], arrays["score"]):
    victim, any_old = h2o_victim(sc[row], sp[old_slots], held, latest, window)
    heads = jnp.arange(sp.shape[1])
    phys = jnp.where(any_old, old_slots[victim], sp.shape[0])  # nothing old enough: out of range, dropped
    poss.append(sp.at[phys, heads].set(-1, mode="drop"))
    scores.append(sc.at[row, jnp.where(any_old, victim, sc.shape[1]), heads].set(0.0, mode="drop"))
  return dict(slot_pos=tuple(poss), score=tuple(scores))


def kept_positions(pool, pages, held: int) -> np.ndarray:
  """[layers, kv_heads, held] positions a request's slots hold per head (-1: evicted), on the host."""
  ps = pool.page_size
  pages = np.asarray(pages, np.int32)
  slots = (pages[:, None] * ps + np.arange(ps)).reshape(-1)[:held]
  return np.stack([np.asarray(sp)[slots].T for sp in pool.policy.slot_pos])
