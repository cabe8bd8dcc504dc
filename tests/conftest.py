"""Test set-up: 8 forced host devices (so meshes, shard_map and ring attention run for real on CPU),
set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The longest single tests start first, so that the two xdist workers (`--dist worksteal`, pyproject addopts)
# are not left with one of them at the end while the other idles; the rest keeps its collection order.
LONG_FIRST = ("parallel/test_multihost.py", "experiments/test_moe_smoke.py", "train/test_relative_workdir.py",
              "train/test_resume.py", "engine/test_speculative_lossless.py", "train/test_cli.py",
              "models/test_moe_serving.py", "experiments/test_quantization_smoke.py", "train/test_save_failure.py",
              "experiments/test_kv_compression_smoke.py", "experiments/test_speculative_smoke.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONG_FIRST)}

  def key(item):
    path = item.nodeid.split("::")[0].removeprefix("tests/")
    return rank.get(path, len(LONG_FIRST))

  items.sort(key=key)  # stable: same order on every worker
