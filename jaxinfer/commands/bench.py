"""`jaxinfer bench <benchmark>`: benchmarks named by the word after `bench`.

  jaxinfer bench serve --config experiments/bench_serve.py     # load over HTTP (jaxinfer/experiments/bench_serve.py)
"""

from __future__ import annotations

import sys

from jaxinfer.config import ConfigError

BENCHMARKS = {"serve": "jaxinfer.experiments.bench_serve"}


def benchmark_name(argv: list[str]) -> str:
  """The word after `bench` on the command line."""
  words = [a for a in argv if not a.startswith("-")]
  if "bench" in words and words.index("bench") + 1 < len(words):
    return words[words.index("bench") + 1]
  return ""


def run(config, argv: list[str] | None = None):
  import importlib

  name = benchmark_name(sys.argv if argv is None else argv)
  if name not in BENCHMARKS:
    raise ConfigError(f"bench: unknown benchmark {name!r}; usage: jaxinfer bench {{{','.join(BENCHMARKS)}}} "
                      "--config experiments/bench_serve.py")
  return importlib.import_module(BENCHMARKS[name]).run(config)
