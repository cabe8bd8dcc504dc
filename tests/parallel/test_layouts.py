"""Token layouts: contiguous, striped, zigzag permutations and their inverses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from parallel import LAYOUTS, striped_permute, striped_unpermute, zigzag_permute, zigzag_unpermute
from parallel.layouts import layout_positions, permute, unpermute


def test_registry():
  assert set(LAYOUTS) == {"contiguous", "striped", "zigzag"}
  assert LAYOUTS["striped"] == (striped_permute, striped_unpermute)
  assert LAYOUTS["zigzag"] == (zigzag_permute, zigzag_unpermute)
  with pytest.raises(ValueError, match="layout='diagonal'"):
    permute(np.arange(8), "diagonal", 2, axis=0)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("axis", [1, -2, 0])
def test_roundtrip_numpy(layout, n, axis):
  x = np.random.default_rng(0).normal(size=(16, 24, 3))
  perm, unperm = LAYOUTS[layout]
  y = perm(x, n, axis=axis)
  assert y.shape == x.shape
  np.testing.assert_array_equal(unperm(y, n, axis=axis), x)
  np.testing.assert_array_equal(np.sort(y, axis=axis), np.sort(x, axis=axis))  # a permutation


def test_striped_puts_token_t_on_device_t_mod_n():
  n, length = 4, 24
  blocks = striped_permute(np.arange(length), n, axis=0).reshape(n, length // n)
  for d in range(n):
    np.testing.assert_array_equal(blocks[d], np.arange(d, length, n))


def test_zigzag_device_i_holds_chunks_i_and_2n_minus_1_minus_i():
  n, length = 4, 32
  c = length // (2 * n)
  blocks = zigzag_permute(np.arange(length), n, axis=0).reshape(n, length // n)
  for i in range(n):
    want = np.concatenate([np.arange(i * c, (i + 1) * c), np.arange((2 * n - 1 - i) * c, (2 * n - i) * c)])
    np.testing.assert_array_equal(blocks[i], want)


def test_layout_positions():
  np.testing.assert_array_equal(layout_positions("striped", 8, 2), [0, 2, 4, 6, 1, 3, 5, 7])
  assert layout_positions("zigzag", 8, 2, batch=3).shape == (3, 8)
  np.testing.assert_array_equal(layout_positions("contiguous", 6, 3), np.arange(6))


def test_not_divisible_raises():
  with pytest.raises(ValueError, match="length 10 along axis 1 is not divisible by 4"):
    striped_permute(np.zeros((1, 10)), 4)
  with pytest.raises(ValueError, match="length 12 along axis 1 is not divisible by 8"):
    zigzag_permute(np.zeros((1, 12)), 4)  # zigzag needs 2N chunks
  with pytest.raises(ValueError, match="not divisible by 4"):
    LAYOUTS["contiguous"][0](np.zeros((1, 10)), 4)


@pytest.mark.parametrize("layout", ["striped", "zigzag"])
def test_sharded_explicit_array_keeps_its_layout(layout):
  """On a seq-sharded Explicit array the permutation runs (eager and under jit) and keeps the sharding;
  shard d then holds exactly the tokens the layout assigns to device d."""
  mesh = jax.make_mesh((2, 4), ("data", "sequence"))
  n, length = 4, 32
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (2, length))
  x = jax.device_put(pos, NamedSharding(mesh, P("data", "sequence")))
  y = permute(x, layout, n)
  y_jit = jax.jit(lambda a: unpermute(permute(a, layout, n), layout, n))(x)
  assert jax.typeof(y).sharding.spec == P("data", "sequence")
  np.testing.assert_array_equal(np.asarray(y_jit), np.asarray(pos))
  want = layout_positions(layout, length, n).reshape(n, length // n)
  for shard in y.addressable_shards:
    d = shard.index[1].start // (length // n)
    np.testing.assert_array_equal(np.asarray(shard.data)[0], want[d])


def _attention_after_layout(layout, mesh, n, q, k, v, w, placement):
  """loss(q, k, v): permute the (not yet sharded) inputs, place them on the mesh, ring attention, unpermute."""
  from parallel import ring_attention

  def loss(q, k, v):
    b, length = q.shape[:2]
    pos = permute(jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length)), layout, n)
    q, k, v = (jax.device_put(permute(x, layout, n), placement) for x in (q, k, v))
    o = ring_attention(q, k, v, mesh=mesh, causal=True, q_positions=pos, kv_positions=pos,
                       implementation="reference")
    return jnp.sum(unpermute(o, layout, n) * w)

  return loss


@pytest.mark.parametrize("layout", ["striped", "zigzag"])
def test_grad_through_permute_of_unsharded_input_on_explicit_mesh(layout):
  """Regression: jit(grad(f)) with f = permute (input not yet sharded) -> device_put on an Explicit mesh ->
  ring_attention -> unpermute used to fail in the VJP of the permutation with a ShardingTypeError in a
  reshape ("float32[2,24,8@sequence,2,32], new sizes: (2, 192, 2, 32)"): the cotangent arrives sharded."""
  from pallas_kernels import flash_attention

  mesh = jax.make_mesh((8,), ("sequence",))
  n, b, length, h, d = 8, 2, 192 if layout == "striped" else 128, 2, 32
  rng = np.random.default_rng(7)
  q, k, v, w = (jnp.asarray(rng.normal(size=(b, length, h, d)), jnp.float32) for _ in range(4))
  loss = _attention_after_layout(layout, mesh, n, q, k, v, w, NamedSharding(mesh, P(None, "sequence")))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  def ref_loss(q, k, v):
    return jnp.sum(flash_attention(q, k, v, causal=True, implementation="reference") * w)

  want = jax.grad(ref_loss, argnums=(0, 1, 2))(q, k, v)
  for name, got, ref in zip("qkv", grads, want):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=2e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("layout", ["striped", "zigzag"])
@pytest.mark.parametrize("in_spec,out_spec", [(None, P(None, "sequence")), (P(None, "sequence"), P("data")),
                                              (P("data", "sequence"), None),
                                              (P(None, None, "sequence"), P(None, "sequence"))],
                         ids=["unsharded-to-seq", "seq-to-data", "data-seq-kept", "feature-to-seq"])
def test_permutation_vjp_accepts_any_sharding(layout, in_spec, out_spec):
  """permute's VJP under jit(grad) for inputs of any sharding (none, seq, batch x seq, another dim) whose
  result is then moved to another sharding (so the cotangent arrives sharded unlike the input): the
  gradient of sum(permute(x) * w) is unpermute(w)."""
  mesh = jax.make_mesh((2, 4), ("data", "sequence"))
  n, shape = 4, (2, 32, 4)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w_np = rng.normal(size=shape).astype(np.float32)
  w = jax.device_put(jnp.asarray(w_np), NamedSharding(mesh, P()))
  if in_spec is not None:
    x = jax.device_put(x, NamedSharding(mesh, in_spec))

  def loss(a, w):
    y = permute(a, layout, n)
    if out_spec is not None:
      y = jax.device_put(y, NamedSharding(mesh, out_spec))
    return jnp.sum(y * w)

  value, dx = jax.jit(jax.value_and_grad(loss))(x, w)
  np.testing.assert_allclose(float(value), np.sum(permute(np.asarray(x), layout, n) * w_np), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(dx), unpermute(w_np, layout, n))
