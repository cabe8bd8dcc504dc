"""benchmarks/device_check.py runs these test modules' functions on a GPU with the implementation swapped in:
check here, on CPU, that its plan still matches them (names, implementation tables, parameters), so a
refactor of the tests cannot silently break the one GPU run."""

from __future__ import annotations

import importlib.util
import inspect
import pathlib
import sys

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def device_check():
  spec = importlib.util.spec_from_file_location("device_check", _ROOT / "benchmarks" / "device_check.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sys.path[:0] = [str(_ROOT / "tests" / "pallas_kernels")]  # the plan imports the test modules by name
  try:
    yield module
  finally:
    sys.path.remove(str(_ROOT / "tests" / "pallas_kernels"))


@pytest.mark.parametrize("cpu", [False, True], ids=["gpu", "cpu"])
def test_plan_names_existing_tests_with_their_arguments(device_check, cpu):
  plan = device_check._kernel_plan(cpu)
  ops = {p[1] for p in plan}
  assert ops - {"quantized_matmul"} == {"flash_attention", "decode_attention", "paged_attention",
                                        "ragged_paged_attention", "shared_prefix_attention"}
  impls = {p[2] for p in plan}
  assert {"pallas_gpu", "xla"} <= impls and ("cudnn" in impls) != cpu
  ids = [p[0] for p in plan]
  assert len(ids) == len(set(ids))
  for case_id, op, impl, module, fn_name, kwargs, table in plan:
    fn = getattr(module, fn_name)
    assert set(inspect.signature(fn).parameters) == set(kwargs), case_id
    if table is not None:
      assert isinstance(getattr(module, table), dict), case_id
  # interleaved across ops, so a time limit cuts every op's tail rather than whole ops
  assert {p[1] for p in plan[:len(ops)]} == ops


def test_param_sets_expand_parametrize_marks(device_check):
  @pytest.mark.parametrize("a, b", [(1, 2), pytest.param(3, 4, marks=pytest.mark.slow)])
  @pytest.mark.parametrize("c", [5, 6])
  def f(a, b, c):
    del a, b, c

  assert device_check._param_sets(f) == [dict(c=5, a=1, b=2), dict(c=5, a=3, b=4), dict(c=6, a=1, b=2),
                                         dict(c=6, a=3, b=4)]
