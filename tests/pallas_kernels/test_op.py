"""The op base (pallas_kernels.op.Op), the shared argument checks (pallas_kernels.validation) and the import
structure of the op folders: every folder dispatches through one Op and no two folders import each other."""

from __future__ import annotations

import ast
import importlib
import logging
import pathlib
import sys
import types

import numpy as np
import pytest

from pallas_kernels import validation as V
from pallas_kernels.op import ImplementationUnavailableError, Op, always_available, needs_backend

# ------------------------------------------------------------------------------------------ a fake op


@pytest.fixture
def fake_op(monkeypatch):
  """An op with three implementations: 'portable' (runs anywhere), 'gpu_only' (needs a GPU unless
  interpreted) and 'broken' (its module cannot be imported). Calls are recorded."""
  calls = []

  def module(name, reason_fn):
    m = types.ModuleType(f"fake_op_pkg.{name}")
    m.unavailable_reason = reason_fn
    m.scale = lambda x, interpret=False: calls.append((name, x, interpret)) or 2 * x
    monkeypatch.setitem(sys.modules, m.__name__, m)

  module("portable", always_available)
  module("gpu_only", lambda interpret: needs_backend("gpu", "gpu_only", interpret))
  op = Op("scale", {"gpu_only": "fake_op_pkg.gpu_only", "portable": "fake_op_pkg.portable",
                    "broken": "fake_op_pkg.not_there"},
          defaults={"cpu": ("gpu_only", "portable"), "gpu": "gpu_only"}, fallback="portable")
  return op, calls


def test_default_is_first_available_preference_and_logged_once(fake_op, caplog):
  op, calls = fake_op
  with caplog.at_level(logging.INFO, logger="pallas_kernels.op"):
    for x in (1.0, 2.0, 3.0):
      assert op.function(None)(x) == 2 * x
  assert [c[0] for c in calls] == ["portable"] * 3  # gpu_only is preferred but cannot run on CPU
  msgs = [r.getMessage() for r in caplog.records if "scale" in r.getMessage()]
  assert msgs == ["scale: implementation=None on backend 'cpu' -> 'portable'"]
  op.forget_choices()
  with caplog.at_level(logging.INFO, logger="pallas_kernels.op"):
    op.default()
  assert sum("scale" in r.getMessage() for r in caplog.records) == 2
  assert op.default(backend="tpu") == "portable"  # a backend without defaults gets the fallback


def test_forced_unavailable_implementation_raises_and_never_falls_back(fake_op):
  op, calls = fake_op
  with pytest.raises(ImplementationUnavailableError, match="implementation='gpu_only' needs a GPU backend"):
    op.function("gpu_only")(1.0)
  with pytest.raises(RuntimeError, match="'broken' cannot be imported"):
    op.function("broken")
  assert calls == []
  assert op.function("gpu_only", interpret=True)(1.5, interpret=True) == 3.0  # interpret mode runs it
  assert calls == [("gpu_only", 1.5, True)]
  assert op.available() == ["portable"]
  assert op.available(interpret=True) == ["gpu_only", "portable"]
  assert "cannot be imported" in op.unavailable_reason("broken")


@pytest.mark.parametrize("bad", ["nope", 3, "", "Portable"])
def test_unknown_implementation_is_a_value_error_naming_it(fake_op, bad):
  op, calls = fake_op
  with pytest.raises(ValueError, match=r"unknown implementation=.* for scale; choose one of \['broken', "
                                       r"'gpu_only', 'portable'\] or None"):
    op.function(bad)
  assert calls == []


def test_op_table_is_checked_when_declared(fake_op):
  op, _ = fake_op
  with pytest.raises(ValueError, match=r"defaults\['gpu'\] names unknown implementations \['triton'\]"):
    Op("x", {"xla": "m"}, {"gpu": ("triton", "xla")})
  with pytest.raises(ValueError, match="fallback='xla'"):
    Op("x", {"reference": "m"}, {})
  with pytest.raises(ValueError, match="no entry 'other'"):
    op.function("portable", entry="other")


def test_no_default_available_is_a_clear_error(monkeypatch):
  m = types.ModuleType("fake_op_pkg2.tpu")
  m.unavailable_reason = lambda interpret: needs_backend("tpu", "tpu", interpret)
  monkeypatch.setitem(sys.modules, m.__name__, m)
  op = Op("only_tpu", {"tpu": m.__name__}, {"cpu": ("tpu",)}, fallback="tpu")
  with pytest.raises(ImplementationUnavailableError, match=r"only_tpu: no implementation of \['tpu'\] can run"):
    op.function(None)


# ---------------------------------------------------------------------------------- the real op folders

_ROOT = pathlib.Path(importlib.import_module("pallas_kernels").__file__).parent
# every op folder (a package with an api.py), so a new op is checked as soon as it exists
OPS = {p.parent.name: f"pallas_kernels.{p.parent.name}.api" for p in sorted(_ROOT.glob("*/api.py"))}


@pytest.mark.parametrize("folder", sorted(OPS))
def test_every_op_folder_declares_one_op_whose_modules_define_every_entry(folder):
  api = importlib.import_module(OPS[folder])
  op = api.OP
  assert isinstance(op, Op) and op.name == folder
  assert set(op.implementations) == set(api.IMPLEMENTATIONS)
  assert op.default(backend="cpu") == "xla"
  for name in op.implementations:
    if op.unavailable_reason(name, interpret=True) is not None:  # e.g. cudnn: no interpret mode
      continue
    module = op.module(name)
    for entry in op.entries:
      assert callable(getattr(module, entry)), (name, entry)
  assert api.available_implementations() == op.available()


def _imported_op_folders(path: pathlib.Path, folders: set) -> set:
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    names = []
    if isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    for n in names:
      parts = n.split(".")
      if len(parts) > 1 and parts[0] == "pallas_kernels" and parts[1] in folders:
        found.add(parts[1])
  return found


def test_no_import_cycles_between_op_folders():
  root = _ROOT
  folders = {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
  assert set(OPS) == folders and {"flash_attention", "decode_attention", "paged_attention",
                                  "shared_prefix_attention"} <= folders
  deps = {f: set() for f in folders}
  for f in folders:
    for path in (root / f).glob("*.py"):
      deps[f] |= _imported_op_folders(path, folders) - {f}
  # the neutral modules (op, validation, lse, decode_common, pages) may import only flash_attention helpers
  for path in root.glob("*.py"):
    if path.name != "__init__.py":
      assert _imported_op_folders(path, folders) <= {"flash_attention"}, path.name

  def reaches(a, b, seen=()):
    return b in deps[a] or any(reaches(c, b, seen + (a,)) for c in deps[a] if c not in seen)

  cycles = sorted((a, b) for a in folders for b in deps[a] if reaches(b, a))
  assert not cycles, f"op folders importing each other: {cycles} (dependencies: {deps})"


# --------------------------------------------------------------------------------- shared argument checks


@pytest.mark.parametrize("call,match", [
    (lambda: V.check_options(sliding_window=0), "sliding_window must be a positive int or None, got 0"),
    (lambda: V.check_options(sliding_window=True), "sliding_window"),
    (lambda: V.check_options(logits_soft_cap=-2.0), "logits_soft_cap must be a positive float"),
    (lambda: V.check_options(sm_scale="0.1"), "sm_scale must be a Python float or None"),
    (lambda: V.check_options(num_splits=2.5), "num_splits must be a positive int"),
    (lambda: V.check_block("block_k", 24, implementation="pallas_gpu", power_of_two=True),
     "block_k=24 for implementation='pallas_gpu': must be a power of two"),
    (lambda: V.check_block("block_q", 12, implementation="xla", multiple_of=8), "block_q=12 .* multiple of 8"),
    (lambda: V.check_block("block_q", 0, implementation="xla"), "block_q=0 .* must be an int >= 1"),
    (lambda: V.check_array([1.0], "q", 3, "[batch, heads, dim]"), "q must be an array"),
    (lambda: V.check_positive_int("page_size", None, allow_none=False), "page_size must be a positive int, got"),
], ids=["window0", "window_bool", "soft_cap", "sm_scale", "splits", "pow2", "multiple", "minimum", "not_array",
        "required"])
def test_shared_checks_raise_value_errors_naming_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_shared_array_checks():
  q, k = np.ones((2, 4, 8), np.float32), np.ones((2, 6, 3, 8), np.float32)
  with pytest.raises(ValueError, match=r"q_heads \(4\) must be a multiple of kv_heads \(3\)"):
    V.check_qkv(q, k, k)
  with pytest.raises(ValueError, match="v must have the shape of k"):
    V.check_qkv(q, k[:, :2, :2], k[:, :3, :2])
  with pytest.raises(ValueError, match=r"kv_lens must have shape \(2,\) \[batch\], got \(3,\)"):
    V.check_shape(np.ones(3, np.int32), "kv_lens", (2,), "[batch]")
  with pytest.raises(ValueError, match="q_positions must be an integer"):
    V.check_int_array(np.ones((2, 4), np.float32), "q_positions", (2, 4), "[batch, length]")
  V.check_int_array(None, "q_positions", (2, 4), "[batch, length]")  # optional arrays may be absent
  V.check_qkv(q, k[:, :, :2], k[:, :, :2])  # GQA 2: fine
