"""Tree attention for verifying a candidate tree (Medusa-style) in one target forward.

Each sequence brings N candidate rows arranged as a tree (`parents[i] < i`, -1 for children of the newest
committed token); row i sits at position context_len + depth(i) and must attend to the whole committed
context and to its own ancestors (itself included), never to its siblings or cousins. Expressed as two
partials over disjoint keys, merged exactly by log-sum-exp (pallas_kernels/lse.py), so the existing ragged
paged-attention kernel is used unchanged:
  context   every tree row as a one-token "sequence" over its sequence's pages, kv_len = context_len
            (a single query at the last position sees every cached key): ragged_paged_attention, return_lse;
  tree      a small dense attention among the step's tree rows, masked by the ancestor matrix.
`tree_rows_attention` is the engine's flat form (members of many sequences, a block-diagonal mask; used by
PagedKVCache for every sequence whose drafts branch); `tree_attention` the per-sequence [S, N] form.
`tree_attention_reference` is the plain dense version (context gathered from the pages, one mask) it is
tested against (tests/engine/test_tree_attention.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels.lse import merge_pair


def ancestor_mask(parents) -> np.ndarray:
  """bool [N, N]: mask[i, j] = row j is row i or one of its ancestors. parents[i] < i, -1 at the root level."""
  parents = [int(p) for p in parents]
  n = len(parents)
  mask = np.eye(n, dtype=bool)
  for i, p in enumerate(parents):
    if not -1 <= p < i:
      raise ValueError(f"tree parents[{i}] = {p}: a parent must come before its child (-1 <= parent < {i})")
    if p >= 0:
      mask[i] |= mask[p]
  return mask


def depths(parents) -> np.ndarray:
  """int32 [N]: depth of each row (children of the committed token have depth 0: position context_len)."""
  mask = ancestor_mask(parents)
  return (mask.sum(-1) - 1).astype(np.int32)


def _dense_tree_part(q, k, v, mask, scale):
  """q [M, H, D], k/v [M, KV, D], mask bool [M, M] -> (out [M, H, D] f32, lse [M, H] f32)."""
  m, h, d = q.shape
  kvh = k.shape[1]
  qf = q.astype(jnp.float32).reshape(m, kvh, h // kvh, d)
  scores = jnp.einsum("nkgd,mkd->kgnm", qf, k.astype(jnp.float32)) * scale
  scores = jnp.where(mask[None, None], scores, -jnp.inf)
  lse = jax.nn.logsumexp(scores, axis=-1)  # every row sees itself: finite
  p = jnp.exp(scores - lse[..., None])
  out = jnp.einsum("kgnm,mkd->nkgd", p, v.astype(jnp.float32)).reshape(m, h, d)
  return out, jnp.transpose(lse, (2, 0, 1)).reshape(m, h)


def tree_rows_attention(q, k_rows, v_rows, mask, k_pages, v_pages, page_table, context_lens, num_rows, *,
                        sm_scale=None, implementation=None, interpret=False, k_scales=None, v_scales=None):
  """The engine's form: M tree members of any sequences, flat. q [M, H, D]; k_rows, v_rows [M, KV, D] their
  own keys/values; mask bool [M, M] (block-diagonal over sequences, each block an ancestor_mask); member i
  reads context_lens[i] cached tokens through page_table [M, pages_per_seq] (its sequence's row). Only the
  first num_rows members are real (the rest are padding, their output is garbage). Returns [M, H, D] f32."""
  m, h, d = q.shape
  scale = sm_scale if sm_scale is not None else 1.0 / float(np.sqrt(d))
  quant = {} if k_scales is None else dict(k_scales=k_scales, v_scales=v_scales)
  out_c, lse_c = pallas_kernels.ragged_paged_attention(
      q, k_pages, v_pages, page_table, context_lens.astype(jnp.int32), jnp.arange(m + 1, dtype=jnp.int32),
      jnp.asarray(num_rows, jnp.int32), sm_scale=scale, return_lse=True, implementation=implementation,
      interpret=interpret, **quant)
  out_t, lse_t = _dense_tree_part(q, k_rows, v_rows, mask, scale)
  out, _ = merge_pair(out_c, lse_c, out_t, lse_t)
  return out


def tree_attention(q, k_tree, v_tree, mask, k_pages, v_pages, page_table, context_lens, *, sm_scale=None,
                   implementation=None, interpret=False):
  """q [S, N, H, D]: the tree rows of S sequences; k_tree, v_tree [S, N, KV, D]: their own keys/values;
  mask bool [S, N, N] (ancestor_mask per sequence); k_pages, v_pages [P, page, KV, D] holding each sequence's
  context_lens[s] committed tokens through page_table [S, pages_per_seq]. Returns [S, N, H, D] in q's dtype."""
  s_, n, h, d = q.shape
  rows = s_ * n
  block = jnp.eye(s_, dtype=bool)[:, None, :, None] & jnp.asarray(mask)[:, :, None, :]  # [S, N, S, N]
  out = tree_rows_attention(
      q.reshape(rows, h, d), k_tree.reshape(rows, *k_tree.shape[2:]), v_tree.reshape(rows, *v_tree.shape[2:]),
      block.reshape(rows, rows), k_pages, v_pages, jnp.repeat(page_table, n, axis=0),
      jnp.repeat(jnp.asarray(context_lens, jnp.int32), n), rows, sm_scale=sm_scale,
      implementation=implementation, interpret=interpret)
  return out.reshape(s_, n, h, d).astype(q.dtype)


def tree_attention_reference(q, k_tree, v_tree, mask, k_pages, v_pages, page_table, context_lens, *, sm_scale=None):
  """Plain dense attention per sequence over [its context from the pages; the tree rows] with one mask."""
  s_, n, h, d = q.shape
  scale = sm_scale if sm_scale is not None else 1.0 / float(np.sqrt(d))
  kvh, page = k_pages.shape[2], k_pages.shape[1]
  outs = []
  for s in range(s_):
    c = int(context_lens[s])
    slots = np.arange(c)
    pages = np.asarray(page_table[s])[slots // page]
    k = jnp.concatenate([k_pages[pages, slots % page], k_tree[s]], 0).astype(jnp.float32)  # [c + n, KV, D]
    v = jnp.concatenate([v_pages[pages, slots % page], v_tree[s]], 0).astype(jnp.float32)
    visible = jnp.concatenate([jnp.ones((n, c), bool), jnp.asarray(mask[s])], 1)  # [n, c + n]
    k = jnp.repeat(k, h // kvh, axis=1)
    v = jnp.repeat(v, h // kvh, axis=1)
    scores = jnp.einsum("nhd,mhd->hnm", q[s].astype(jnp.float32), k) * scale
    p = jax.nn.softmax(jnp.where(visible[None], scores, -jnp.inf), axis=-1)
    outs.append(jnp.einsum("hnm,mhd->nhd", p, v))
  return jnp.stack(outs).astype(q.dtype)
