"""`jaxinfer train`: start the multi-host runtime if the environment asks for it, then train.

  jaxinfer train --config experiments/quickstart.py [--config.train.steps=200 --config.workdir=results/x]

Running the same command with the same workdir resumes from its latest complete checkpoint.
"""

from __future__ import annotations

import logging

from jaxinfer.config import ConfigError
from parallel.distributed import initialize_from_env


def run(config):
  if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file it writes at INFO
    logging.getLogger("jax").setLevel(logging.WARNING)  # backend probing ("Unable to initialize backend 'tpu'")
  try:
    initialize_from_env()  # before anything touches a JAX backend; a no-op for a single process
  except ValueError as e:
    raise ConfigError(f"environment: {e}") from None
  from jaxinfer.train.trainer import train

  return train(config)
