"""AdamW with linear warmup + cosine decay, global-norm gradient clipping, no decay on vectors."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(train) -> optax.Schedule:
  """Linear warmup over warmup_steps (step k < warmup uses lr * (k + 1) / warmup), then cosine decay from lr
  to lr * min_lr_ratio at train.steps."""
  peak = float(train.learning_rate)
  warmup = int(train.warmup_steps)
  decay_steps = max(1, int(train.steps) - warmup)
  cosine = optax.cosine_decay_schedule(peak, decay_steps, alpha=float(train.min_lr_ratio))
  if warmup <= 1:
    return cosine
  ramp = optax.linear_schedule(peak / warmup, peak, warmup - 1)
  return optax.join_schedules([ramp, cosine], [warmup])


def _decay_mask(params):
  # weight decay on matrices only: norms' scales and biases are left alone
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(train)
  parts = []
  if train.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(train.grad_clip)))
  parts.append(optax.adamw(schedule, b1=float(train.b1), b2=float(train.b2), eps=float(train.eps),
                           weight_decay=float(train.weight_decay), mask=_decay_mask))
  return optax.chain(*parts), schedule
