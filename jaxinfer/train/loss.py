"""Next-token cross entropy over packed rows: masked so no target crosses a document or lies in padding."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def next_token_nll(logits, targets, loss_mask):
  """(sum of -log p(target) over unmasked tokens, number of unmasked tokens), both float32 scalars.

  logits [..., seq, vocab] (any float dtype; computed in float32), targets and loss_mask [..., seq]. The
  packer already shifted targets by one and set loss_mask=0 where the target starts another document or the
  row is padding (segment 0), so this is a plain masked sum.
  """
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask)
