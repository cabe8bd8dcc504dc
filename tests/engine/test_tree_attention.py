"""Tree attention (jaxinfer/engine/tree_attention.py): context through the ragged paged-attention kernel plus
the dense ancestor-masked tree part, lse-merged, equals one dense masked attention; every implementation
available on CPU (xla, and the Pallas kernels in interpret mode); the tree helpers' bad input."""

import numpy as np
import pytest
from testlib import assert_close, randn, random_page_table

from pallas_kernels.paged_attention.api import available_implementations
from jaxinfer.engine.tree_attention import (ancestor_mask, depths, tree_attention, tree_attention_reference,
                                            tree_rows_attention)

S, N, H, KV, D, PAGE, PAGES_PER_SEQ = 3, 6, 4, 2, 32, 8, 4
PARENTS = [[-1, -1, -1, 0, 0, 1], [-1, 0, 1, 2, 2, -1], [-1, -1, 0, 1, 2, 3]]  # top-3 x top-2-like, chain, mixed


def _inputs():
  rng = np.random.default_rng(0)
  q = randn((S, N, H, D), "tree-q")
  kt, vt = randn((S, N, KV, D), "tree-k"), randn((S, N, KV, D), "tree-v")
  num_pages = S * PAGES_PER_SEQ + 2
  kp, vp = randn((num_pages, PAGE, KV, D), "tree-kp"), randn((num_pages, PAGE, KV, D), "tree-vp")
  table = random_page_table(rng, num_pages, S, PAGES_PER_SEQ)
  context = np.array([5, 17, 30], np.int32)  # not page multiples
  mask = np.stack([ancestor_mask(p) for p in PARENTS])
  return q, kt, vt, mask, kp, vp, table, context


# xla, and one Pallas kernel in interpret mode (the GPU one interprets ~2x slower on CPU; both share the API)
@pytest.mark.parametrize("impl", ["xla", "pallas_tpu"])
def test_tree_attention_matches_dense_reference(impl):
  assert impl in available_implementations(interpret=True)
  q, kt, vt, mask, kp, vp, table, context = _inputs()
  want = tree_attention_reference(q, kt, vt, mask, kp, vp, table, context)
  got = tree_attention(q, kt, vt, mask, kp, vp, table, context, implementation=impl,
                       interpret=impl.startswith("pallas"))
  assert_close(got, want, 2e-5, f"tree attention ({impl})")


def test_flat_members_with_padding_match_the_reference():
  # the engine's form: the members of sequences 0 and 2 back to back, then padding members (num_rows < M)
  q, kt, vt, mask, kp, vp, table, context = _inputs()
  want = tree_attention_reference(q, kt, vt, mask, kp, vp, table, context)
  seqs, m = [0, 2], 2 * N + 3
  pad = lambda x, fill=0: np.concatenate([np.asarray(x), np.full((3,) + np.shape(x)[1:], fill, np.asarray(x).dtype)])  # noqa: E731
  block = np.eye(m, dtype=bool)
  for i in range(2):
    block[i * N:(i + 1) * N, i * N:(i + 1) * N] = mask[seqs[i]]
  got = tree_rows_attention(pad(np.concatenate([q[s] for s in seqs])), pad(np.concatenate([kt[s] for s in seqs])),
                            pad(np.concatenate([vt[s] for s in seqs])), block, kp, vp,
                            pad(np.repeat(table[seqs], N, axis=0)), pad(np.repeat(context[seqs], N)), 2 * N,
                            implementation="xla")
  assert_close(got[:2 * N].reshape(2, N, H, D), want[np.asarray(seqs)], 2e-5, "flat tree members")


def test_tree_mask_is_not_causal():
  # a sibling's key must not change a row's output (a causal mask over the flattened tree would see it)
  q, kt, vt, mask, kp, vp, table, context = _inputs()
  base = tree_attention(q, kt, vt, mask, kp, vp, table, context, implementation="xla")
  kt2 = kt.at[0, 1].set(kt[0, 1] + 3.0)  # row 1 of sequence 0: a sibling of rows 0 and 2, an ancestor of 5
  moved = tree_attention(q, kt2, vt, mask, kp, vp, table, context, implementation="xla")
  np.testing.assert_array_equal(np.asarray(moved[0, [0, 2, 3, 4]]), np.asarray(base[0, [0, 2, 3, 4]]))
  assert not np.allclose(np.asarray(moved[0, [1, 5]]), np.asarray(base[0, [1, 5]]))


def test_tree_helpers():
  assert depths([-1, -1, -1, 0, 0, 1]).tolist() == [0, 0, 0, 1, 1, 1]
  m = ancestor_mask([-1, 0, 1])
  assert m.tolist() == [[True, False, False], [True, True, False], [True, True, True]]
  with pytest.raises(ValueError, match=r"tree parents\[1\] = 1: a parent must come before its child"):
    ancestor_mask([-1, 1])
