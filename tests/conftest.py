"""Test set-up: 8 forced host devices (so meshes, shard_map and ring attention run for real on CPU),
set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Longest files first (two xdist workers take whole files, `--dist loadfile` in pyproject addopts): the long
# single tests and the big parametrised files start early, so the two workers finish close together (longest
# processing time first); the rest keeps its collection order. Measured on the 2-core machine.
LONG_FIRST = ("parallel/test_multihost.py", "parallel/test_tensor_parallel.py", "pallas_kernels/test_flash_attention.py",
              "parallel/test_ring_attention.py", "experiments/test_moe_smoke.py", "train/test_resume.py",
              "train/test_relative_workdir.py", "engine/test_speculative.py", "models/test_moe_hf_parity.py",
              "models/test_moe_serving.py", "engine/test_speculative_lossless.py", "train/test_save_failure.py",
              "train/test_cli.py", "experiments/test_quantization_smoke.py", "parallel/test_expert_parallel.py",
              "experiments/test_kv_compression_smoke.py", "experiments/test_speculative_smoke.py",
              "engine/test_kv_policy.py", "engine/test_kv_quantization.py", "pallas_kernels/test_paged_attention.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONG_FIRST)}

  def key(item):
    path = item.nodeid.split("::")[0].removeprefix("tests/")
    return rank.get(path, len(LONG_FIRST))

  items.sort(key=key)  # stable, and whole files stay together: the same order on every worker
