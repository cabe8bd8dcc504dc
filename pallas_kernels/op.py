"""The op base every op folder uses: an implementation table, availability, the backend default (logged once)
and a clear error for a forced implementation that cannot run here.

An op folder declares one `Op` in its api.py:

    IMPLEMENTATIONS = implementation_table("pallas_kernels.decode_attention")  # reference, xla, gpu, tpu modules
    OP = Op("decode_attention", IMPLEMENTATIONS, PALLAS_DEFAULTS)  # gpu: pallas_gpu, then xla; cpu: xla

Each implementation is a module (imported on first use) that exposes the op's function(s) under the op's
entry names and `unavailable_reason(interpret) -> str | None` (None: it can run here). The public function
validates its arguments (pallas_kernels.validation) and calls `OP.function(implementation, interpret)(...)`.
A new op (quantized matmul, grouped matmul) is a new folder with its own Op; a new implementation is one line
in the table.

- implementation=None: the first available name of `defaults[backend]` (a preference list), logged once per
  op and backend at INFO on the `pallas_kernels.op` logger.
- implementation="name" that cannot run here (wrong backend, a Pallas backend this JAX lacks): raises
  ImplementationUnavailableError (a RuntimeError) naming it and why; never a silent fallback.
- an unknown name or a non-string: ValueError naming `implementation` and listing the choices.
"""

from __future__ import annotations

import importlib
import logging
import types
from collections.abc import Mapping, Sequence

import jax

logger = logging.getLogger(__name__)


class ImplementationUnavailableError(RuntimeError):
  """A forced implementation cannot run on this machine (the message says which one and why)."""


def always_available(interpret) -> str | None:
  """unavailable_reason of an implementation that runs on every backend (plain jnp / XLA)."""
  del interpret
  return None


def needs_backend(backend: str, name: str, interpret, *, interpret_mode: str = "interpret mode") -> str | None:
  """unavailable_reason of a Pallas implementation for `backend` ('gpu' or 'tpu'): None on that backend or
  with interpret=True, else a sentence saying what it needs."""
  if interpret or jax.default_backend() == backend:
    return None
  return (f"implementation={name!r} needs a {backend.upper()} backend (the default backend is "
          f"{jax.default_backend()!r}); pass interpret=True to run it in {interpret_mode} on CPU")


def requires_backend(backend: str, name: str, *, interpret_mode: str = "interpret mode"):
  """An implementation module's `unavailable_reason` for a Pallas kernel of `backend` (see needs_backend)."""

  def unavailable_reason(interpret) -> str | None:
    return needs_backend(backend, name, interpret, interpret_mode=interpret_mode)

  return unavailable_reason


# The usual op folder: reference.py, xla.py, gpu.py (Pallas Triton), tpu.py (Pallas Mosaic); a Pallas kernel
# for the backend first, blockwise XLA where it is missing or on CPU.
STANDARD_MODULES = {"reference": "reference", "xla": "xla", "pallas_gpu": "gpu", "pallas_tpu": "tpu"}
PALLAS_DEFAULTS = {"gpu": ("pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla"), "cpu": ("xla",)}


def implementation_table(package: str, modules: Mapping[str, str] = STANDARD_MODULES) -> dict[str, str]:
  """name -> module path, for the modules (name -> file stem) of one op folder."""
  return {name: f"{package}.{stem}" for name, stem in modules.items()}


class Op:
  """One kernel op: name -> implementation module, backend -> preferred implementations."""

  def __init__(self, name: str, implementations: Mapping[str, str],
               defaults: Mapping[str, str | Sequence[str]], *, entries: Sequence[str] | None = None,
               fallback: str = "xla"):
    """name: the op (and its default entry function); implementations: name -> module path; defaults:
    backend -> implementation or preference list; entries: the function names every module exposes
    (default (name,)); fallback: the choice on a backend missing from `defaults`."""
    self.name = name
    self.implementations = dict(implementations)
    self.defaults = {b: (d,) if isinstance(d, str) else tuple(d) for b, d in defaults.items()}
    self.entries = tuple(entries or (name,))
    self.fallback = fallback
    for backend, names in self.defaults.items():
      unknown = [n for n in names if n not in self.implementations]
      if unknown:
        raise ValueError(f"{name}: defaults[{backend!r}] names unknown implementations {unknown}")
    if fallback not in self.implementations:
      raise ValueError(f"{name}: fallback={fallback!r} is not an implementation")
    self._logged: set[str] = set()

  def __repr__(self) -> str:
    return f"Op({self.name!r}, implementations={sorted(self.implementations)})"

  # -------------------------------------------------------------------------------------------- the table

  def _check_name(self, implementation) -> str:
    if not isinstance(implementation, str) or implementation not in self.implementations:
      raise ValueError(f"unknown implementation={implementation!r} for {self.name}; choose one of "
                       f"{sorted(self.implementations)} or None")
    return implementation

  def module(self, implementation: str) -> types.ModuleType:
    """The module of an implementation (ValueError if unknown; ImplementationUnavailableError if this JAX
    cannot import it, e.g. a Pallas backend that a later JAX release removed)."""
    path = self.implementations[self._check_name(implementation)]
    try:
      return importlib.import_module(path)
    except ImportError as e:
      raise ImplementationUnavailableError(
          f"{self.name}: implementation={implementation!r} cannot be imported with jax {jax.__version__}: {e}"
      ) from e

  def unavailable_reason(self, implementation: str, interpret=False) -> str | None:
    """None when the implementation can run here (with this interpret setting), else why not."""
    try:
      return self.module(implementation).unavailable_reason(interpret)
    except ImplementationUnavailableError as e:
      return str(e)

  def available(self, interpret=False) -> list[str]:
    """Names of the implementations that can run on this machine, in table order."""
    return [n for n in self.implementations if self.unavailable_reason(n, interpret) is None]

  # ------------------------------------------------------------------------------------------ the choice

  def default(self, backend: str | None = None, interpret=False) -> str:
    """The implementation for implementation=None: the first available of the backend's preferences,
    logged once per backend."""
    backend = backend or jax.default_backend()
    prefs = self.defaults.get(backend, (self.fallback,))
    name = next((n for n in prefs if self.unavailable_reason(n, interpret) is None), None)
    if name is None:
      reasons = "; ".join(f"{n}: {self.unavailable_reason(n, interpret)}" for n in prefs)
      raise ImplementationUnavailableError(f"{self.name}: no implementation of {list(prefs)} can run on "
                                           f"backend {backend!r} ({reasons})")
    if backend not in self._logged:
      self._logged.add(backend)
      logger.info("%s: implementation=None on backend %r -> %r", self.name, backend, name)
    return name

  def forget_choices(self) -> None:
    """Log the next default choice again (for tests)."""
    self._logged.clear()

  def resolve(self, implementation, interpret=False) -> types.ModuleType:
    """The module that runs the call: the default for None, else the named one if it can run here."""
    name = self.default(interpret=interpret) if implementation is None else self._check_name(implementation)
    reason = self.unavailable_reason(name, interpret)
    if reason is not None:
      raise ImplementationUnavailableError(reason)
    return self.module(name)

  def function(self, implementation, interpret=False, entry: str | None = None):
    """The entry function (default: the op's name) of the implementation that runs the call."""
    entry = entry or self.entries[0]
    if entry not in self.entries:
      raise ValueError(f"{self.name} has no entry {entry!r} (entries: {self.entries})")
    module = self.resolve(implementation, interpret)
    fn = getattr(module, entry, None)
    if fn is None:
      raise ImplementationUnavailableError(f"{self.name}: implementation module {module.__name__} does not "
                                           f"define {entry}")
    return fn
