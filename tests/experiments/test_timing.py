"""The shared timing helper: warm-up excluded, repeats, median / min, interleaved rounds, ratios."""

import pytest

from jaxinfer.experiments import timing


class FakeClock:
  """A clock that a call advances by the cost its function declares, so timings are exact."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now

  def work(self, seconds_list):
    it = iter(seconds_list)

    def fn():
      self.now += next(it)
      return self.now

    return fn


@pytest.fixture
def clock(monkeypatch):
  c = FakeClock()
  monkeypatch.setattr(timing, "clock", c)
  return c


def test_time_call_drops_warmup_and_keeps_results(clock):
  t = timing.time_call(clock.work([100.0, 3.0, 1.0, 2.0]), warmup=1, repeats=3)
  assert t.times == (3.0, 1.0, 2.0)  # the 100 s "compile" is not counted
  assert t.median == 2.0 and t.min == 1.0
  assert t.results == (103.0, 104.0, 106.0)


def test_setup_and_teardown_are_not_timed(clock):
  order = []
  case = timing.Case(clock.work([5.0, 5.0]), setup=lambda: (order.append("setup"), clock.work([50.0])()),
                     teardown=lambda: order.append("teardown"))
  t = timing.time_call(case, warmup=0, repeats=2)
  assert t.times == (5.0, 5.0)
  assert order == ["setup", "teardown"] * 2


def test_compare_interleaves_rounds_and_gives_speedups(clock):
  calls = []

  def case(name, seconds):
    def fn():
      calls.append(name)
      clock.now += seconds
    return fn

  c = timing.compare({"base": case("base", 4.0), "fast": case("fast", 1.0)}, baseline="base", rounds=2, warmup=1,
                     repeats=2)
  assert calls == ["base"] * 3 + ["fast"] * 3 + ["base"] * 3 + ["fast"] * 3  # round by round
  assert len(c.timings["base"].times) == 4
  assert c.speedup("fast") == pytest.approx(4.0) and c.speedup("base") == 1.0
  with pytest.raises(ValueError, match="baseline 'nope'"):
    timing.compare({"base": case("base", 1.0)}, baseline="nope")
  with pytest.raises(ValueError, match="statistic"):
    timing.compare({"base": case("base", 1.0)}, baseline="base", stat="mean", warmup=0, repeats=1)


def test_ratios_against_the_baseline():
  r = timing.ratios({"static": 200.0, "continuous": 580.0}, "static")
  assert r == {"static": 1.0, "continuous": pytest.approx(2.9)}
  with pytest.raises(ValueError, match="repeats"):
    timing.time_call(lambda: None, repeats=0)
