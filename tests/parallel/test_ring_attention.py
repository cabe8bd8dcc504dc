"""Ring attention on 8 forced host devices against single-device flash_attention (forward and gradients)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import flash_attention
from parallel import LAYOUTS, ring_attention
from parallel.ring_attention import block_may_be_visible
from testlib import randn

ATOL = 2e-5


def _mesh(shape, names, kind):
  t = AxisType.Explicit if kind == "explicit" else AxisType.Auto
  return jax.make_mesh(shape, names, axis_types=(t,) * len(shape))


def _segments(batch, length, rng):
  """Packed segments: sorted ids with 2-3 random boundaries per row."""
  rows = []
  for _ in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, length), size=rng.integers(2, 4), replace=False))
    rows.append(np.searchsorted(cuts, np.arange(length), side="right"))
  return jnp.asarray(np.stack(rows), jnp.int32)


def _inputs(batch, length, hq, hkv, d, seed):
  tag = f"ring/{seed}/{batch}/{length}/{hq}/{hkv}/{d}"
  q = randn((batch, length, hq, d), f"{tag}/q")
  k = randn((batch, length, hkv, d), f"{tag}/k")
  v = randn((batch, length, hkv, d), f"{tag}/v")
  w = randn((batch, length, hq, d), f"{tag}/w")  # cotangent weights of the loss
  return q, k, v, w


def _ring_loss_and_grads(mesh, n, layout, q, k, v, w, *, causal, q_seg, kv_seg, window, implementation,
                         spec=None, batch_axes=None, q_pos=None, kv_pos=None):
  perm, unperm = LAYOUTS[layout]
  b, length = q.shape[:2]
  if q_pos is None:
    q_pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
  if kv_pos is None:
    kv_pos = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), (b, k.shape[1]))
  if spec is not None:
    q, k, v = (jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v))

  def loss(q, k, v):
    p = lambda x: None if x is None else perm(x, n)
    o = ring_attention(p(q), p(k), p(v), mesh=mesh, causal=causal, q_positions=p(q_pos), kv_positions=p(kv_pos),
                       q_segment_ids=p(q_seg), kv_segment_ids=p(kv_seg), sliding_window=window,
                       implementation=implementation, batch_axes=batch_axes)
    o = unperm(o, n)
    return jnp.sum(o * w), o

  (_, o), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return o, g


def _ref_loss_and_grads(q, k, v, w, *, causal, q_seg, kv_seg, window):
  def loss(q, k, v):
    o = flash_attention(q, k, v, causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg, sliding_window=window,
                        implementation="reference")
    return jnp.sum(o * w), o

  (_, o), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return o, g


def _assert_close(got, want):
  o, g = got
  o_ref, g_ref = want
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=ATOL, rtol=ATOL)
  for name, a, b in zip("qkv", g, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL, rtol=ATOL, err_msg=f"d{name}")


# (mesh shape, mesh axes, axis kind, layout, causal, (q_heads, kv_heads), segments, window, batch, length,
#  input spec, implementation). Per-device lengths (12, 24, 30) are not multiples of any kernel block.
CASES = {
    "seq8-contiguous-causal": ((8,), ("sequence",), "explicit", "contiguous", True, (2, 2), False, None, 1, 96,
                               None, "reference"),
    "seq8-striped-gqa-segments": ((8,), ("sequence",), "explicit", "striped", True, (4, 2), True, None, 2, 96,
                                  None, "xla"),
    "seq8-zigzag-mqa-window-auto": ((8,), ("sequence",), "auto", "zigzag", True, (4, 1), False, 20, 1, 192,
                                    None, "reference"),
    "data2xseq4-contiguous-bidirectional-segments": ((2, 4), ("data", "sequence"), "explicit", "contiguous", False,
                                                     (2, 2), True, None, 2, 96, P("data", "sequence"),
                                                     "reference"),
    "data2xseq4-striped-gqa-segments-window-auto": ((2, 4), ("data", "sequence"), "auto", "striped", True, (4, 2),
                                                    True, 17, 2, 120, P("data", "sequence"), "reference"),
    "data2xseq4-zigzag-bidirectional-window": ((2, 4), ("data", "sequence"), "explicit", "zigzag", False, (4, 4),
                                               False, 25, 2, 96, P("data"), "reference"),
    "tensor2xseq4-striped-heads-sharded": ((2, 4), ("tensor", "sequence"), "explicit", "striped", True, (4, 2),
                                           False, None, 1, 96, P(None, "sequence", "tensor"), "xla"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ring_matches_flash_attention(case):
  shape, names, kind, layout, causal, (hq, hkv), segs, window, batch, length, spec, impl = CASES[case]
  mesh = _mesh(shape, names, kind)
  n = mesh.shape["sequence"]
  q, k, v, w = _inputs(batch, length, hq, hkv, 16, seed=len(case))
  seg = _segments(batch, length, np.random.default_rng(len(case))) if segs else None
  got = _ring_loss_and_grads(mesh, n, layout, q, k, v, w, causal=causal, q_seg=seg, kv_seg=seg, window=window,
                             implementation=impl, spec=spec)
  want = _ref_loss_and_grads(q, k, v, w, causal=causal, q_seg=seg, kv_seg=seg, window=window)
  _assert_close(got, want)


def test_eager_rows_without_visible_keys_and_output_sharding():
  """Eager call (no jit); some queries see no key at all (their segment has no key): output 0, finite grads.
  The output and gradients keep the inputs' layout (batch over data, seq over sequence)."""
  mesh = _mesh((2, 4), ("data", "sequence"), "explicit")
  q, k, v, w = _inputs(2, 64, 2, 2, 32, seed=3)
  wd = jax.device_put(w, NamedSharding(mesh, P("data", "sequence")))
  q_seg = jnp.asarray(np.repeat([[0, 1, 2, 7]], 16, axis=1).repeat(2, axis=0), jnp.int32)  # 7: no such key
  kv_seg = jnp.asarray(np.repeat([[0, 1, 2, 2]], 16, axis=1).repeat(2, axis=0), jnp.int32)
  sh = NamedSharding(mesh, P("data", "sequence"))
  qd, kd, vd = (jax.device_put(x, sh) for x in (q, k, v))
  qs, ks = (jax.device_put(x, sh) for x in (q_seg, kv_seg))

  def loss(q, k, v):
    o = ring_attention(q, k, v, mesh=mesh, q_segment_ids=qs, kv_segment_ids=ks, implementation="reference")
    return jnp.sum(o * wd), o

  with jax.set_mesh(mesh):  # eager autodiff of Explicit-sharded arrays wants the mesh in context
    (_, o2), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(qd, kd, vd)
  assert jax.typeof(o2).sharding.spec == P("data", "sequence", None, None)
  np.testing.assert_array_equal(np.asarray(o2)[:, 48:], 0.0)
  assert all(jax.typeof(x).sharding.spec == P("data", "sequence", None, None) for x in g)
  want = _ref_loss_and_grads(q, k, v, w, causal=True, q_seg=q_seg, kv_seg=kv_seg, window=None)
  _assert_close((o2, g), want)


def test_auto_mesh_under_jit_defaults_batch_and_heads_axes():
  """Traced arrays on Auto axes carry no layout: batch goes over data, heads over tensor (jaxinfer's rules);
  batch_axes=() / head_axes=() override that."""
  mesh = _mesh((2, 2, 2), ("data", "sequence", "tensor"), "auto")
  q, k, v, _ = _inputs(2, 48, 4, 2, 16, seed=7)
  f = lambda q, k, v, **kw: ring_attention(q, k, v, mesh=mesh, implementation="reference", **kw)
  o = jax.jit(f)(q, k, v)
  assert o.sharding.spec == P("data", "sequence", "tensor")
  np.testing.assert_allclose(np.asarray(o), np.asarray(flash_attention(q, k, v, implementation="reference")),
                             atol=ATOL, rtol=ATOL)
  o2 = jax.jit(lambda q, k, v: f(q, k, v, batch_axes=(), head_axes=()))(q, k, v)
  assert o2.sharding.spec == P(None, "sequence")
  np.testing.assert_allclose(np.asarray(o2), np.asarray(o), atol=ATOL, rtol=ATOL)


def test_no_full_sequence_tensor_on_a_device():
  """After SPMD partitioning, no buffer of the forward+backward program has the global length 104."""
  mesh = _mesh((8,), ("sequence",), "explicit")
  q, k, v, w = _inputs(1, 104, 2, 2, 16, seed=5)
  sh = NamedSharding(mesh, P(None, "sequence"))
  q, k, v, w = (jax.device_put(x, sh) for x in (q, k, v, w))
  loss = lambda q, k, v, w: jnp.sum(ring_attention(q, k, v, mesh=mesh, implementation="reference") * w)
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v, w).compile().as_text()
  shapes = re.findall(r"[a-z0-9]+\[([0-9,]*)\]", hlo)
  assert shapes and not [s for s in shapes if "104" in s.split(",")]


def test_block_may_be_visible():
  qp = jnp.arange(8, 16)[None]
  assert bool(block_may_be_visible(qp, jnp.arange(0, 8)[None], causal=True))
  assert not bool(block_may_be_visible(qp, jnp.arange(16, 24)[None], causal=True))
  assert bool(block_may_be_visible(qp, jnp.arange(16, 24)[None], causal=False))
  assert not bool(block_may_be_visible(qp, jnp.arange(0, 4)[None], causal=True, sliding_window=5))
  seg = lambda x: jnp.full((1, 8), x, jnp.int32)
  assert not bool(block_may_be_visible(qp, jnp.arange(0, 8)[None], seg(1), seg(0), causal=True))


@pytest.fixture(scope="module")
def mesh24():
  return _mesh((2, 4), ("data", "sequence"), "explicit")


def _bad(mesh, **overrides):
  q, k, v, _ = _inputs(2, 32, 2, 2, 16, seed=0)
  args = dict(q=q, k=k, v=v)
  kwargs = dict(mesh=mesh)
  for key, value in overrides.items():
    (args if key in args else kwargs)[key] = value
  return ring_attention(args["q"], args["k"], args["v"], **kwargs)


def test_bad_axis_name(mesh24):
  with pytest.raises(ValueError, match="axis_name='seq'"):
    _bad(mesh24, axis_name="seq")


def test_bad_length_not_divisible(mesh24):
  q, k, v, _ = _inputs(1, 30, 2, 2, 16, seed=0)
  with pytest.raises(ValueError, match="q sequence length 30 is not divisible by the size 4"):
    _bad(mesh24, q=q, k=k, v=v)


def test_bad_sequence_sharded_over_other_axis(mesh24):
  q, k, v, _ = _inputs(2, 32, 2, 2, 16, seed=0)
  q = jax.device_put(q, NamedSharding(mesh24, P(None, "data")))
  with pytest.raises(ValueError, match=r"q is sharded along its sequence dimension over mesh axes \('data',\)"):
    _bad(mesh24, q=q)


def test_bad_sequence_mismatch(mesh24):
  q, k, v, _ = _inputs(2, 32, 2, 2, 16, seed=0)
  with pytest.raises(ValueError, match="k and v must have the same shape"):
    _bad(mesh24, v=v[:, :16])
  with pytest.raises(ValueError, match=r"q_positions has shape \(2, 16\)"):
    _bad(mesh24, q_positions=jnp.zeros((2, 16), jnp.int32))


def test_bad_batch_or_head_axes(mesh24):
  with pytest.raises(ValueError, match="batch cannot be sharded over mesh axes \\['sequence'\\]"):
    _bad(mesh24, batch_axes="sequence")
  q, k, v, _ = _inputs(2, 32, 4, 1, 16, seed=0)
  with pytest.raises(ValueError, match="kv_heads=1 is not divisible by the size 2"):
    _bad(mesh24, q=q, k=k, v=v, head_axes="data")
