"""Next-token cross entropy over packed rows: masked so no target crosses a document or lies in padding."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def next_token_nll(logits, targets, loss_mask):
  """(sum of -log p(target) over unmasked tokens, number of unmasked tokens), both float32 scalars.

  logits [..., seq, vocab] (any float dtype; computed in float32), targets and loss_mask [..., seq]. The
  packer already shifted targets by one and set loss_mask=0 where the target starts another document or the
  row is padding (segment 0), so this is a plain masked sum.
  """
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask)


def moe_router_loss(aux: list[dict], cfg) -> tuple[jnp.ndarray, dict]:
  """(weighted router loss, statistics) from the per-layer MoE records of jaxinfer.models.moe.capture_moe_aux.

  loss = router_aux_loss_coef * mean over MoE layers of the load-balancing loss (Switch / Mixtral form)
       + router_z_loss_coef * mean of the router z-loss (ST-MoE). statistics: the two unweighted means,
  the per-layer expert load [moe layers, experts] (fraction of assignments) and the dropped assignments.
  A dense model (no records) gives (0, {}).
  """
  if not aux:
    return jnp.float32(0), {}
  balance = jnp.mean(jnp.stack([a["load_balance_loss"] for a in aux]))
  z = jnp.mean(jnp.stack([a["z_loss"] for a in aux]))
  stats = {"moe_balance_loss": balance, "moe_z_loss": z, "moe_dropped": sum(a["dropped"] for a in aux),
           "moe_expert_load": jnp.stack([a["expert_load"] for a in aux])}
  return cfg.router_aux_loss_coef * balance + cfg.router_z_loss_coef * z, stats


def moe_record(metrics: dict) -> dict:
  """The MoE entries of a train step's (host) metrics as JSON values for metrics.jsonl."""
  out = {}
  for key in ("moe_balance_loss", "moe_z_loss", "moe_dropped"):
    if key in metrics:
      out[key] = float(metrics[key])
  if "moe_expert_load" in metrics:
    out["moe_expert_load"] = [[round(float(v), 6) for v in row] for row in metrics["moe_expert_load"]]
  return out
