"""Test set-up: 8 forced host devices (so meshes, shard_map and ring attention run for real on CPU),
set before JAX is imported anywhere."""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One XLA compilation cache per test run (both xdist workers and every subprocess a test starts share it, through
# the environment): the same program built again from a new Python function (each train() call jits its own
# step, each subprocess starts cold) is read back instead of compiled again. Keyed by XLA on the program, the
# devices and the flags, so a hit is the very executable a compile would give; the run starts empty and the
# controller removes it at the end, so nothing carries over between runs. An outside JAX_COMPILATION_CACHE_DIR
# is respected (and kept); JAXINFER_TEST_XLA_CACHE=0 turns the cache off.
_RUN_CACHE = None
if os.environ.get("JAXINFER_TEST_XLA_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _RUN_CACHE = tempfile.mkdtemp(prefix="jaxinfer-test-xla-cache-")  # made by the controller; workers inherit it
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _RUN_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Longest files first (two xdist workers take whole files, `--dist loadfile` in pyproject addopts): the long
# single tests and the big parametrised files start early, so the two workers finish close together (longest
# processing time first); the rest keeps its collection order. Measured on the 2-core machine.
LONG_FIRST = ("parallel/test_multihost.py", "parallel/test_tensor_parallel.py", "pallas_kernels/test_flash_attention.py",
              "parallel/test_ring_attention.py", "experiments/test_moe_smoke.py", "train/test_resume.py",
              "train/test_relative_workdir.py", "engine/test_speculative.py", "models/test_moe_hf_parity.py",
              "models/test_moe_serving.py", "engine/test_speculative_lossless.py", "train/test_save_failure.py",
              "experiments/test_quantization_smoke.py", "parallel/test_expert_parallel.py",
              "experiments/test_kv_compression_smoke.py", "experiments/test_speculative_smoke.py",
              "engine/test_kv_policy.py", "engine/test_kv_quantization.py", "pallas_kernels/test_paged_attention.py",
              "engine/test_medusa_engine.py", "train/test_medusa.py", "engine/test_kv_policy_quant.py",
              "parallel/test_kv_policy_tp.py", "engine/test_kv_policy_table.py",
              "engine/test_kv_policy_duo.py", "engine/test_kv_policy_prefix_attention.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONG_FIRST)}

  def key(item):
    path = item.nodeid.split("::")[0].removeprefix("tests/")
    return rank.get(path, len(LONG_FIRST))

  items.sort(key=key)  # stable, and whole files stay together: the same order on every worker


def pytest_unconfigure(config):
  # the controller (or the only process with -n 0) ends last: the run's compilation cache goes with it
  if _RUN_CACHE and "PYTEST_XDIST_WORKER" not in os.environ:
    shutil.rmtree(_RUN_CACHE, ignore_errors=True)
