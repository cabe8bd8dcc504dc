"""Driver: a training run (`driver = "train"`, e.g. experiments/quickstart.py and experiments/tiny.py).

`jaxinfer run --config experiments/quickstart.py` does what `jaxinfer train --config experiments/quickstart.py`
does: the multi-host runtime if the environment asks for it, then jaxinfer.train.trainer.train, which writes
its workdir (checkpoints, metrics.jsonl, loss_curve.png, results.md, hf/) through the shared writer's pieces
and resumes from the latest checkpoint there. A training config's smoke setting is experiments/tiny.py (or
overrides such as --config.train.steps=4 --config.data.max_bytes=200000).
"""

from __future__ import annotations


def run(config):
  from jaxinfer.commands.train import run as train

  return train(config)
