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
