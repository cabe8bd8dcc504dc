"""Public entry point `quantized_matmul(x, w, scales, zeros, *, bits, group_size, implementation=None)`, its op
table (pallas_kernels.op.Op) and its argument checks. The weight layout is in packing.py.

Each implementation module exposes `quantized_matmul(x2d, w, scales, zeros, *, bits, group_size, interpret)`
(plus its own tile keywords, reachable by calling the module directly) and `unavailable_reason(interpret)`.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import validation as V
from pallas_kernels.op import PALLAS_DEFAULTS, Op, implementation_table
from pallas_kernels.quantized_matmul.packing import SUPPORTED_BITS, codes_per_byte

IMPLEMENTATIONS: dict[str, str] = implementation_table("pallas_kernels.quantized_matmul")
DEFAULT_FOR_BACKEND: dict[str, tuple[str, ...]] = dict(PALLAS_DEFAULTS)
OP = Op("quantized_matmul", IMPLEMENTATIONS, DEFAULT_FOR_BACKEND)

_LAYOUT = "[K / group_size, N]"


def validate(x, w, scales, zeros, *, bits, group_size):
  """Raises ValueError naming the argument and the limit (shapes and dtypes only: works under jit)."""
  if bits not in SUPPORTED_BITS:
    raise ValueError(f"bits must be one of {SUPPORTED_BITS} (codes of fewer bits use the bits=8 container), "
                     f"got {bits!r}")
  if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be a floating-point array [..., K], got shape {tuple(x.shape)} dtype {x.dtype}")
  k = x.shape[-1]
  V.check_positive_int("group_size", group_size, allow_none=False)
  if k % group_size:
    raise ValueError(f"x's K={k} is not a multiple of group_size={group_size}")
  if bits == 4 and group_size % 2:
    raise ValueError(f"bits=4 packs two codes per byte along K: group_size={group_size} must be even")
  V.check_array(w, "w", 2, "[K / codes_per_byte, N]")
  if w.dtype != jnp.uint8:
    raise ValueError(f"w must hold uint8 codes, got dtype {w.dtype}")
  if w.shape[0] * codes_per_byte(bits) != k:
    raise ValueError(f"w has {w.shape[0]} rows; bits={bits} with K={k} needs {k // codes_per_byte(bits)}")
  shape = (k // group_size, w.shape[1])
  for name, a in (("scales", scales), ("zeros", zeros)):
    V.check_array(a, name, 2, _LAYOUT, floating=True)
    V.check_shape(a, name, shape, _LAYOUT)


def available_implementations(interpret=False) -> list[str]:
  return OP.available(interpret)


def quantized_matmul(x, w, scales, zeros, *, bits: int, group_size: int, implementation=None, interpret=False):
  """x @ W for W [K, N] stored as codes with group scales and zero points (packing.py).

  Args:
    x: [..., K] float32 or bfloat16 activations.
    w: uint8 codes: [K, N] for bits=8, [K / 2, N] nibble-packed for bits=4.
    scales, zeros: float [K / group_size, N]; W[k, n] = (code - zeros[g, n]) * scales[g, n], g = k // group_size.
    bits: 4 or 8; group_size: input rows per group (K for one group per output column).
    implementation: one of IMPLEMENTATIONS or None (gpu: pallas_gpu, tpu: pallas_tpu, cpu: xla; logged once);
      one that cannot run here raises RuntimeError.
    interpret: run the Pallas kernels in interpret mode (CPU).

  Returns [..., N] in x's dtype (accumulated in float32).
  """
  validate(x, w, scales, zeros, bits=bits, group_size=group_size)
  fn = OP.function(implementation, interpret)
  lead = x.shape[:-1]
  y = fn(x.reshape(-1, x.shape[-1]), w, scales, zeros, bits=bits, group_size=group_size, interpret=interpret)
  return y.reshape(*lead, w.shape[1])
