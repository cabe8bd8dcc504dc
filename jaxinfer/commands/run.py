"""`jaxinfer run`: run any experiment by its config's `driver` field.

  jaxinfer run --config experiments/serving.py [--config.run_name=load0.8 --config.serving.load=0.8]
  jaxinfer run --config experiments/serving.py --config.smoke=True --config.workdir=/tmp/s   # tiny sizes

The driver is `jaxinfer.experiments.<driver>`; it writes `<workdir>/<run_name>/` (resolved_config.json,
metrics.jsonl, results.md, plots) with the shared writer, jaxinfer/experiments/results.py.
"""

from __future__ import annotations

from jaxinfer.config import require


def run(config):
  from jaxinfer.experiments import available, driver

  require("driver" in config, "driver", "missing: an experiment config names its driver (one of "
          f"{', '.join(available())})")
  return driver(config.driver).run(config)
