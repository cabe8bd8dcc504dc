"""The one timing helper: warm-up, repeats, median / min, and ratios against a baseline measured in the same run.

  t = time_call(step_fn, warmup=1, repeats=12)          # Timing: .median, .min, .times, .results
  c = compare({"baseline": Case(f0), "ours": Case(f1)}, baseline="baseline", rounds=2, repeats=7)
  c.speedup("ours")                                     # baseline time / our time, same statistic

A timed call's result is blocked on (`jax.block_until_ready`), so asynchronous dispatch does not hide the
work. `compare` interleaves its cases round by round, so drift on a shared machine hits them alike; a case's
`setup` (untimed, before every call) prepares state such as requests admitted to an engine.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Mapping

clock = time.perf_counter  # seconds; a module attribute so tests can drive it


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds per timed call (warm-up excluded) and what each call returned."""
  times: tuple[float, ...]
  results: tuple[Any, ...] = ()

  @property
  def median(self) -> float:
    return statistics.median(self.times)

  @property
  def min(self) -> float:
    return min(self.times)

  def stat(self, name: str) -> float:
    if name not in ("median", "min"):
      raise ValueError(f"statistic must be 'median' or 'min', got {name!r}")
    return getattr(self, name)

  def __add__(self, other: "Timing") -> "Timing":
    return Timing(self.times + other.times, self.results + other.results)


@dataclasses.dataclass(frozen=True)
class Case:
  """What `compare` times: `fn()` (timed); `setup()` and `teardown()` run untimed around every call."""
  fn: Callable[[], Any]
  setup: Callable[[], Any] | None = None
  teardown: Callable[[], Any] | None = None


def _block(value):
  try:
    import jax
  except ImportError:  # pragma: no cover - jax is a dependency
    return value
  return jax.block_until_ready(value)


def time_call(fn: Callable[[], Any] | Case, *, warmup: int = 1, repeats: int = 5) -> Timing:
  """Call `fn` `warmup` times untimed (compiles), then `repeats` times timed."""
  if warmup < 0 or repeats < 1:
    raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
  case = fn if isinstance(fn, Case) else Case(fn)
  times, results = [], []
  for i in range(warmup + repeats):
    if case.setup is not None:
      case.setup()
    start = clock()
    result = _block(case.fn())
    elapsed = clock() - start
    if case.teardown is not None:
      case.teardown()
    if i >= warmup:
      times.append(elapsed)
      results.append(result)
  return Timing(tuple(times), tuple(results))


@dataclasses.dataclass(frozen=True)
class Comparison:
  timings: dict[str, Timing]
  baseline: str
  stat: str = "median"

  def time(self, name: str) -> float:
    return self.timings[name].stat(self.stat)

  def speedup(self, name: str) -> float:
    """Baseline seconds / `name`'s seconds (> 1: faster than the baseline)."""
    return self.time(self.baseline) / self.time(name)


def compare(cases: Mapping[str, Case | Callable[[], Any]], *, baseline: str, rounds: int = 1, warmup: int = 1,
            repeats: int = 5, stat: str = "median") -> Comparison:
  """Time every case in the same run: `rounds` rounds, each warming up then timing every case in turn."""
  if baseline not in cases:
    raise ValueError(f"baseline {baseline!r} is not one of the cases {list(cases)}")
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}")
  timings: dict[str, Timing] = {}
  for _ in range(rounds):
    for name, case in cases.items():
      t = time_call(case, warmup=warmup, repeats=repeats)
      timings[name] = timings[name] + t if name in timings else t
  comparison = Comparison(timings, baseline, stat)
  comparison.time(baseline)  # checks `stat`
  return comparison


def ratios(values: Mapping[str, float], baseline: str) -> dict[str, float]:
  """Each value divided by the baseline's (e.g. throughput vs the baseline measured in the same run)."""
  if baseline not in values:
    raise ValueError(f"baseline {baseline!r} is not one of {list(values)}")
  return {name: value / values[baseline] for name, value in values.items()}
