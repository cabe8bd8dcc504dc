"""Training: optax AdamW on sharded NNX params, Orbax checkpoints, metrics, Hugging Face export.

Entry point: `jaxinfer train --config experiments/<name>.py` (jaxinfer.commands.train) or `train(config)`.
"""

from __future__ import annotations

from jaxinfer.train.config import TrainConfig, training_config, validate_sections
from jaxinfer.train.loss import next_token_nll
from jaxinfer.train.trainer import TrainResult, check_parallel_config, train


def create_sharded_model(model_cfg, mesh, rules, seed: int = 0):
  """A Transformer whose parameters are created directly in the shardings the logical-axis rules give.

  (jaxinfer's binding of parallel.sharding.create_sharded_module: `parallel` does not import the models.)
  Returns (model, shardings).
  """
  from flax import nnx

  from jaxinfer.models.transformer import Transformer
  from parallel.sharding import create_sharded_module

  return create_sharded_module(lambda: Transformer(model_cfg, rngs=nnx.Rngs(seed)), mesh, rules)


__all__ = ["TrainResult", "check_parallel_config", "create_sharded_model", "next_token_nll", "train",
           "TrainConfig", "training_config", "validate_sections"]
