"""Driver: Medusa-1 heads on a frozen base (`driver = "medusa"`, experiments/medusa.py).

`jaxinfer run --config experiments/medusa.py` does what `jaxinfer train --config experiments/medusa.py` does:
the trainer with train.objective="medusa" (jaxinfer/train/medusa.py), which writes its workdir (checkpoints,
metrics.jsonl, loss_curve.png, head_accuracy.png, results.md) and the heads beside the base. MedusaSection is
imported here so that loading the config resolves the `medusa` section's paths (base_dir, output_dir) like
the shared sections' (jaxinfer.config.load.driver_sections).
"""

from __future__ import annotations

from jaxinfer.train.medusa import MedusaSection  # noqa: F401  (the driver's config section)


def run(config):
  from jaxinfer.commands.train import run as train

  return train(config)
