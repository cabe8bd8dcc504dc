"""Mixture-of-Experts block (Mixtral, Qwen2-MoE, Qwen3-MoE): router + stacked experts + optional shared expert.

    y = sum_{j < k} p_j * SwiGLU_{e_j}(x)  [+ sigmoid(x . w_sg) * SharedSwiGLU(x)]

Routing (as transformers does it): p = softmax(x W_r) over all experts in float32, the top k kept, renormalised
to sum 1 when norm_topk_prob (Mixtral always: softmax over the selected logits is the same thing). Expert
weights are stacked [E, in, out] with logical axes ("expert", "embed", "mlp") / ("expert", "mlp", "embed"),
so an `expert` mesh axis shards them; the computation is chosen by cfg.moe_impl (jaxinfer/models/
moe_experts.py) and, inside `parallel.expert_parallel.expert_parallel(mesh)`, dispatched to the experts'
devices with all-to-all.

Capacity (cfg.capacity_factor > 0, GShard / DeepSpeed-MoE style): each expert keeps at most
C = ceil(cf * T * k / E) of the T*k assignments of a forward pass, first choices before second choices, earlier
tokens first; the rest are dropped (the token keeps its residual path only). Dropless when cf == 0.

Training statistics: within `capture_moe_aux`, every MoE block records its router load-balancing loss
(Switch / Mixtral form, E * sum_e f_e P_e with f_e the assignments to e per token), router z-loss
(mean logsumexp^2, ST-MoE), per-expert load (fraction of the assignments) and the number of dropped
assignments. Outside it nothing is recorded, so inference and the engine see the plain module.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.models.config import ModelConfig
from jaxinfer.models.layers import Linear, logical_param
from jaxinfer.models.moe_experts import IMPLEMENTATIONS

_CAPTURE: contextvars.ContextVar[bool] = contextvars.ContextVar("moe_capture", default=False)
AUX_KEY = "moe_aux"


def route(router_logits, k: int, norm_topk_prob: bool):
  """router_logits [T, E] -> (expert_ids [T, k] int32, weights [T, k] float32, probs [T, E] float32)."""
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  weights, expert_ids = jax.lax.top_k(probs, k)
  if norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return expert_ids.astype(jnp.int32), weights, probs


def capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int | None:
  """Assignments each expert keeps (None: dropless)."""
  if capacity_factor <= 0:
    return None
  return max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))


def apply_capacity(expert_ids, num_experts: int, cap: int | None):
  """expert_ids with assignments past an expert's capacity replaced by the sentinel E; and their count."""
  if cap is None:
    return expert_ids, jnp.zeros((), jnp.int32)
  t, k = expert_ids.shape
  # Priority: all first choices (in token order), then all second choices, ...
  one_hot = jax.nn.one_hot(expert_ids.T.reshape(-1), num_experts, dtype=jnp.int32)  # [k*T, E]
  position = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1).reshape(k, t).T  # [T, k]
  keep = position < cap
  return jnp.where(keep, expert_ids, num_experts), jnp.sum(~keep).astype(jnp.int32)


def router_statistics(router_logits, probs, expert_ids, num_experts: int) -> dict:
  """Load-balancing loss, z-loss and per-expert load of one block's routing (float32 scalars / [E])."""
  t, k = expert_ids.shape
  counts = jnp.sum(jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32), axis=(0, 1))  # [E]
  f = counts / t  # sums to k (transformers' load_balancing_loss_func normalisation)
  p = jnp.mean(probs, axis=0)
  z = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)
  return {"load_balance_loss": num_experts * jnp.sum(f * p), "z_loss": jnp.mean(z * z),
          "expert_load": counts / (t * k)}


@contextlib.contextmanager
def _capturing():
  token = _CAPTURE.set(True)
  try:
    yield
  finally:
    _CAPTURE.reset(token)


def capture_moe_aux(fn):
  """fn(model, *args) -> (fn's result, [per MoE layer, in layer order: dict of router statistics]).

  Works under jit, grad and nnx.remat (values travel as nnx.Intermediate state, via nnx.capture)."""
  captured = nnx.capture(fn, nnx.Intermediate)

  def run(model, *args, **kwargs):
    with _capturing():
      out, state = captured(model, *args, **kwargs)
    found = []
    for path, value in nnx.to_flat_state(state):
      if path[-1] == AUX_KEY:
        layer = next(p for p in path if isinstance(p, int))
        found.append((layer, value.get_value()[0]))
    return out, [stats for _, stats in sorted(found, key=lambda item: item[0])]

  return run


class Experts(nnx.Module):
  """E stacked SwiGLU experts: gate_proj, up_proj [E, d, f], down_proj [E, f, d]."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    e, d, f = cfg.num_experts, cfg.hidden_size, cfg.resolved_moe_intermediate_size
    pdt = jnp.dtype(cfg.param_dtype)
    init = nnx.initializers.normal(cfg.initializer_range)
    self.gate_proj = logical_param(rngs, init, (e, d, f), pdt, ("expert", "embed", "mlp"))
    self.up_proj = logical_param(rngs, init, (e, d, f), pdt, ("expert", "embed", "mlp"))
    self.down_proj = logical_param(rngs, init, (e, f, d), pdt, ("expert", "mlp", "embed"))

  def weights(self):
    return self.gate_proj[...], self.up_proj[...], self.down_proj[...]


class MoEBlock(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    from jaxinfer.models.transformer import MLP  # the dense SwiGLU, reused as the shared expert

    pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    lin = dict(use_bias=False, param_dtype=pdt, dtype=dt, init_std=cfg.initializer_range, rngs=rngs)
    self.gate = Linear(cfg.hidden_size, cfg.num_experts, axes=("embed", None), **lin)  # the router
    self.experts = Experts(cfg, rngs)
    if cfg.shared_expert_intermediate_size:
      self.shared_expert = MLP(cfg.replace(intermediate_size=cfg.shared_expert_intermediate_size, mlp_bias=False),
                               rngs)
      self.shared_expert_gate = Linear(cfg.hidden_size, 1, axes=("embed", None), **lin)
    else:
      self.shared_expert = self.shared_expert_gate = None
    self.num_experts, self.top_k, self.norm_topk_prob = cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob
    self.capacity_factor, self.impl, self.dtype = cfg.capacity_factor, cfg.moe_impl, dt
    self.expert_mesh = None  # set by use_expert_parallel (static: part of the graph definition)

  def __call__(self, x):
    from parallel.expert_parallel import current_expert_mesh, expert_parallel_experts

    shape = x.shape
    tokens = x.reshape(-1, shape[-1]).astype(self.dtype)
    logits = self.gate(tokens)
    expert_ids, weights, probs = route(logits, self.top_k, self.norm_topk_prob)
    cap = capacity(tokens.shape[0], self.top_k, self.num_experts, self.capacity_factor)
    kept_ids, dropped = apply_capacity(expert_ids, self.num_experts, cap)
    mesh = self.expert_mesh or current_expert_mesh()
    if mesh is None:
      y = IMPLEMENTATIONS[self.impl](tokens, kept_ids, weights, *self.experts.weights())
    else:
      y = expert_parallel_experts(mesh, IMPLEMENTATIONS[self.impl], tokens, kept_ids, weights,
                                  *self.experts.weights())
    if self.shared_expert is not None:
      y = y + jax.nn.sigmoid(self.shared_expert_gate(tokens)) * self.shared_expert(tokens)
    if _CAPTURE.get():
      stats = router_statistics(logits, probs, expert_ids, self.num_experts)
      self.sow(nnx.Intermediate, AUX_KEY, stats | {"dropped": dropped.astype(jnp.float32)})
    return y.reshape(shape).astype(x.dtype)


def use_expert_parallel(model, mesh):
  """Every MoE block of `model` dispatches its experts over mesh's `expert` axis (None / size 1: local).

  The mesh becomes a static attribute of the blocks, so it is part of the model's graph definition: anything
  that splits the model once and jits (generate, the engine) compiles the expert-parallel program. Returns
  the model."""
  from parallel.expert_parallel import AXIS

  use = mesh if mesh is not None and mesh.shape.get(AXIS, 1) > 1 else None
  for _, module in nnx.iter_modules(model):
    if isinstance(module, MoEBlock):
      module.expert_mesh = use
  return model


def make_mlp(cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
  """The MLP of decoder layer `layer`: an MoE block where the config says so, the dense SwiGLU otherwise."""
  if cfg.is_moe_layer(layer):
    return MoEBlock(cfg, rngs)
  from jaxinfer.models.transformer import MLP

  return MLP(cfg, rngs)
