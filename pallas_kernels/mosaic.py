"""In-kernel helpers shared by the Pallas Mosaic TPU kernels (flash_attention/tpu.py, paged_attention/tpu.py)
and their interpret-mode switch. A neutral module: it imports no op folder."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu

LANES = 128  # the last (lane) dimension of a vreg
SUBLANES = 8  # its second-to-last (sublane) dimension


def lanes_to(x, n: int):
  """[rows, 128] lane-replicated values -> [rows, n] (tiled by whole vregs, then trimmed)."""
  reps = -(-n // LANES)
  if reps > 1:
    x = jnp.tile(x, (1, reps))
  return x if x.shape[1] == n else x[:, :n]


def mxu_dot(a, b, *, trans_b: bool = False):
  """a @ b (or a @ b^T) on the MXU with float32 accumulation; float32 inputs at full precision."""
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def interpret_params(interpret):
  """pallas_call's `interpret` for a TPU kernel: True -> TPU interpret mode (pltpu.InterpretParams), False ->
  compiled, an InterpretParams as given."""
  if interpret is True:
    return pltpu.InterpretParams()
  return interpret or False
