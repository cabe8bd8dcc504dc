"""Calibration: token-id batches in, each selected Linear's input Hessian H = 2 X X^T / n out (float64).

The model runs under jaxinfer.models.layers.observe_linear_inputs, which hands every Linear's input to the
observer before its matmul; the observer runs while jit traces, so the statistics are outputs of one program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.models.layers import observe_linear_inputs
from jaxinfer.quant.rules import path_name


def batches(calibration, vocab_size: int) -> list[np.ndarray]:
  """calibration (an int array [n, seq] or a list of them) -> a list of int32 [n, seq] arrays, checked."""
  if calibration is None:
    raise ValueError("calibration: this method needs token-id batches (an int array [n, seq] or a list of them)")
  items = list(calibration) if isinstance(calibration, (list, tuple)) else [calibration]
  out = []
  for i, b in enumerate(items):
    a = np.asarray(b)
    if a.ndim != 2 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
      raise ValueError(f"calibration[{i}]: expected a non-empty integer array [n, seq], got shape {a.shape} "
                       f"dtype {a.dtype}")
    if a.min() < 0 or a.max() >= vocab_size:
      raise ValueError(f"calibration[{i}]: token ids must lie in [0, {vocab_size}), got [{a.min()}, {a.max()}]")
    out.append(a.astype(np.int32))
  return out


def hessians(model, paths, token_batches) -> dict[str, np.ndarray]:
  """path -> H [in, in] over every token of every batch, for the Linear layers of `model` at `paths`.

  One jitted program per call: the observer runs while jit traces the model and returns X^T X of each
  selected layer (float32, full precision) as the program's outputs."""
  wanted = set(paths)
  graphdef, state = nnx.split(model)

  def xtx(state, tokens):
    m = nnx.merge(graphdef, state)
    names = {id(mod): path_name(p) for p, mod in nnx.iter_modules(m)}
    out = {}

    def observe(module, x):
      name = names.get(id(module))
      if name in wanted:
        xm = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        out[name] = out.get(name, 0.0) + jnp.dot(xm.T, xm, precision=jax.lax.Precision.HIGHEST)

    with observe_linear_inputs(observe):
      m(tokens) if "lm_head" in wanted else m(tokens, return_hidden=True)
    return out

  fn = jax.jit(xtx)
  sums: dict[str, np.ndarray] = {}
  rows = 0
  for tokens in token_batches:
    for name, value in fn(state, tokens).items():
      sums[name] = sums.get(name, 0.0) + np.asarray(value, np.float64)
    rows += tokens.size
  missing = wanted - set(sums)
  if missing:
    raise RuntimeError(f"calibration: layers {sorted(missing)} never ran on the calibration batches")
  return {k: 2.0 * v / rows for k, v in sums.items()}
