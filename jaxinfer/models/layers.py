"""Small NNX layers whose parameters carry logical axis names (mapped onto mesh axes by parallel.sharding).

The quantized-linear seam: every projection is a `Linear`, and a Linear's `kernel` is either a float
nnx.Param [in, out] or a quantized weight (jaxinfer.quant.weights: any NNX module with
`matmul(x, dtype) -> y` and `dequantized() -> [in, out]`). `Linear.__call__` is the one path both take, so
the model code is the same for every quantization method. `observe_linear_inputs` lets calibration see
every Linear's input (eagerly, outside jit).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import nnx


def logical_param(rngs: nnx.Rngs | None, init, shape, dtype, axes: tuple[str | None, ...]) -> nnx.Param:
  """A Param initialised by `init(key, shape, dtype)` with its logical axis names in metadata."""
  key = rngs.params() if rngs is not None else jax.random.key(0)
  return nnx.Param(init(key, shape, dtype), logical_axes=axes)


_OBSERVER: contextvars.ContextVar = contextvars.ContextVar("linear_observer", default=None)


@contextlib.contextmanager
def observe_linear_inputs(observer):
  """Within the block, every Linear call first runs observer(linear_module, x) (calibration statistics)."""
  token = _OBSERVER.set(observer)
  try:
    yield
  finally:
    _OBSERVER.reset(token)


def linear_matmul(x, kernel, dtype):
  """x @ kernel in `dtype`: a float Param, or a quantized weight's own matmul (the one seam)."""
  if isinstance(kernel, nnx.Variable):
    return jnp.dot(x.astype(dtype), kernel[...].astype(dtype))
  return kernel.matmul(x.astype(dtype), dtype)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); kernel is [in, out] (the transpose of a torch Linear weight), float or quantized."""

  def __init__(self, in_features, out_features, *, axes, use_bias, param_dtype, dtype, init_std, rngs):
    self.kernel = logical_param(rngs, nnx.initializers.normal(init_std), (in_features, out_features),
                                param_dtype, axes)
    self.bias = logical_param(rngs, nnx.initializers.zeros, (out_features,), param_dtype,
                              (axes[1],)) if use_bias else None
    self.dtype = dtype

  def __call__(self, x):
    observer = _OBSERVER.get()
    if observer is not None:
      observer(self, x)
    y = linear_matmul(x, self.kernel, self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class RMSNorm(nnx.Module):
  """Normalises in float32, then scales in the compute dtype (as Hugging Face's LlamaRMSNorm does)."""

  def __init__(self, dim, *, eps, param_dtype, dtype, axis_name="norm"):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(self.dtype) * xf.astype(self.dtype)


class Embed(nnx.Module):
  def __init__(self, vocab_size, dim, *, param_dtype, dtype, init_std, rngs):
    self.embedding = logical_param(rngs, nnx.initializers.normal(init_std), (vocab_size, dim), param_dtype,
                                   ("vocab", "embed"))
    self.dtype = dtype

  def __call__(self, tokens):
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x):
    """Logits against the (tied) embedding table."""
    return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)
