"""Rematerialisation (activation checkpointing) of the decoder layer stack, chosen by `train.remat`.

Each DecoderLayer of the model is re-typed to a subclass whose __call__ runs the original one under
`nnx.remat` with a jax.checkpoint policy; parameter paths and the layer code stay exactly the model's own, so
checkpoints and Hugging Face exports are unaffected. (A `remat` hook on jaxinfer.models.Transformer would be
the cleaner home for this; until the model has one, the trainer applies it from outside.)
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from jaxinfer.config import ConfigError

POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute elementwise ops
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls only
}


@functools.lru_cache(maxsize=None)
def _remat_class(base: type, policy_name: str) -> type:
  policy = POLICIES[policy_name]

  def __call__(self, *args):
    return nnx.remat(lambda layer, *a: base.__call__(layer, *a), policy=policy, prevent_cse=True)(self, *args)

  return type(f"Remat{base.__name__}", (base,), {"__call__": __call__, "__module__": __name__})


def apply_remat(model, policy_name: str):
  """Re-types every layer of model.layers in place for `policy_name` (one of POLICIES); returns the model."""
  if policy_name not in POLICIES:
    raise ConfigError(f"train.remat: {policy_name!r} is not one of {', '.join(POLICIES)}")
  if POLICIES[policy_name] is None and policy_name == "none":
    return model
  for layer in model.layers:
    base = type(layer)
    while base.__name__.startswith("Remat") and base.__module__ == __name__:
      base = base.__mro__[1]
    object.__setattr__(layer, "__class__", _remat_class(base, policy_name))
  return model
