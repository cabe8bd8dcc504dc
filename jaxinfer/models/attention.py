"""The one attention function every model layer calls; kernels and sequence parallelism plug in here.

By default it is pallas_kernels.flash_attention with the implementation the model config names. Inside
`with sequence_parallel(mesh, axis_name)`, it is parallel.ring_attention over that mesh axis instead; the
token layout (contiguous / striped / zigzag) is applied by whoever feeds the model (the data pipeline
permutes tokens and positions once), so attention itself only ever sees positions.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import pallas_kernels


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
  mesh: object
  axis_name: str = "sequence"
  batch_axes: object = None  # mesh axes of batch / heads when not the defaults of parallel.sharding's rules
  head_axes: object = None


_SEQUENCE_PARALLEL: contextvars.ContextVar[SequenceParallel | None] = contextvars.ContextVar(
    "jaxinfer_sequence_parallel", default=None)


@contextlib.contextmanager
def sequence_parallel(mesh, axis_name: str = "sequence", batch_axes=None, head_axes=None):
  """Within this block (while tracing), model attention runs as ring attention over mesh axis `axis_name`.

  batch_axes / head_axes: where batch and heads are sharded, for rules other than the default ones (inside
  jit on an Auto mesh ring attention cannot read the layout; see parallel.ring_attention)."""
  token = _SEQUENCE_PARALLEL.set(SequenceParallel(mesh, axis_name, batch_axes, head_axes))
  try:
    yield
  finally:
    _SEQUENCE_PARALLEL.reset(token)


def attention(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window,
              implementation=None):
  """Causal attention, mask given by token positions and segment ids. Shapes as pallas_kernels.flash_attention."""
  sp = _SEQUENCE_PARALLEL.get()
  if sp is not None and sp.mesh.shape.get(sp.axis_name, 1) > 1:
    from parallel.ring_attention import ring_attention  # lazily: only sequence-parallel runs need it

    return ring_attention(
        q, k, v, mesh=sp.mesh, axis_name=sp.axis_name, causal=True, q_positions=q_positions,
        kv_positions=kv_positions, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        sliding_window=sliding_window, implementation=implementation, batch_axes=sp.batch_axes,
        head_axes=sp.head_axes)
  return pallas_kernels.flash_attention(
      q, k, v, causal=True, q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, sliding_window=sliding_window, implementation=implementation)
