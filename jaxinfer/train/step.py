"""The jitted train and eval steps: pure functions of (state, batch); the NNX module is split once.

TrainState is a dict {"step", "params", "opt_state", "rng"}: params is the model's nnx.State (float32 master
weights; the model casts to its compute dtype), rng the raw key data of a PRNG key advanced every step. A
batch is a dict of [grad_accum, micro_batch, seq_len] int32 arrays (inputs, targets, positions, segment_ids,
loss_mask): the step scans over the accumulation axis, summing float32 gradients of the token-summed loss, and
divides once by the number of loss tokens in the whole batch, so accumulation is exactly the mean over the
global batch (up to float summation order).
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfer.models.attention import sequence_parallel
from jaxinfer.models.moe import capture_moe_aux
from jaxinfer.train.loss import moe_router_loss, next_token_nll
from parallel.expert_parallel import expert_parallel

BATCH_FIELDS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


def _context(mesh: Mesh | None):
  if mesh is not None and mesh.shape.get("sequence", 1) > 1:
    return sequence_parallel(mesh, "sequence")
  return contextlib.nullcontext()


def micro_loss(graphdef, params, micro: dict[str, Any], sp_mesh: Mesh | None = None):
  """(nll sum, token count) of one micro-batch ([rows, seq] fields)."""
  model = nnx.merge(graphdef, params)
  with _context(sp_mesh):
    logits = model(micro["inputs"], micro["positions"], micro["segment_ids"])
  return next_token_nll(logits, micro["targets"], micro["loss_mask"])


def micro_objective(graphdef, params, micro: dict[str, Any], sp_mesh: Mesh | None = None):
  """(nll sum + token count x weighted MoE router losses, (nll sum, MoE statistics)) of one micro-batch; for a
  dense model the objective is the nll sum and the statistics are empty."""
  model = nnx.merge(graphdef, params)
  with _context(sp_mesh):
    logits, aux = capture_moe_aux(lambda m, *a: m(*a))(model, micro["inputs"], micro["positions"],
                                                       micro["segment_ids"])
  nll, count = next_token_nll(logits, micro["targets"], micro["loss_mask"])
  router_loss, stats = moe_router_loss(aux, model.config)
  return nll + count * router_loss, (nll, stats)


def loss_and_grads(graphdef, params, batch, sp_mesh: Mesh | None = None, with_stats: bool = False):
  """(mean loss over all loss tokens, grads of that mean, token count) for a [accum, rows, seq] batch.

  The loss reported is the next-token nll; the gradient also includes the MoE router losses (if any).
  with_stats: a fourth result, the MoE statistics averaged over the micro-batches ({} for a dense model)."""
  total = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
  first = {k: v[0] for k, v in batch.items()}
  stats_shape = jax.eval_shape(lambda p: micro_objective(graphdef, p, first, sp_mesh)[1][1], params)

  def one(carry, micro):
    grad_sum, nll_sum, stats_sum = carry
    (_, (nll, stats)), grads = jax.value_and_grad(
        lambda p: micro_objective(graphdef, p, micro, sp_mesh), has_aux=True)(params)
    grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
    stats_sum = jax.tree.map(lambda a, s: a + s.astype(jnp.float32), stats_sum, stats)
    return (grad_sum, nll_sum + nll, stats_sum), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  stats0 = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), stats_shape)
  (grad_sum, nll_sum, stats_sum), _ = jax.lax.scan(one, (zeros, jnp.float32(0), stats0), batch)
  grads = jax.tree.map(lambda g: g / total, grad_sum)
  if with_stats:
    accum = batch["inputs"].shape[0]
    return nll_sum / total, grads, total, jax.tree.map(lambda s: s / accum, stats_sum)
  return nll_sum / total, grads, total


def train_step(graphdef, tx: optax.GradientTransformation, state, batch, sp_mesh: Mesh | None = None):
  loss, grads, tokens, moe_stats = loss_and_grads(graphdef, state["params"], batch, sp_mesh, with_stats=True)
  return optimizer_step(tx, state, loss, grads, tokens, moe_stats)


def optimizer_step(tx: optax.GradientTransformation, state, loss, grads, tokens, stats):
  """The TrainState after one optimizer update with `grads`, and the step's metrics (any objective's step)."""
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])
  new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": rng}
  return new_state, {"loss": loss, "grad_norm": grad_norm, "loss_tokens": tokens, **stats}


def eval_step(graphdef, params, batch, sp_mesh: Mesh | None = None):
  """(nll sum, token count) over a [n, rows, seq] batch (n is small: a Python loop, not a scan, so that
  nnx.remat'ed layers never see parameters closed over from an outer trace)."""
  nll, count = jnp.float32(0), jnp.float32(0)
  for i in range(batch["inputs"].shape[0]):
    n, c = micro_loss(graphdef, params, {k: v[i] for k, v in batch.items()}, sp_mesh)
    nll, count = nll + n, count + c
  return nll, count


def init_train_state(params, tx: optax.GradientTransformation, seed: int):
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "rng": jax.random.key_data(jax.random.key(seed))}


def train_state_shardings(abstract_params, param_shardings, tx: optax.GradientTransformation, mesh: Mesh):
  """NamedShardings of the whole TrainState: optimizer moments follow their parameters, scalars replicate."""
  replicated = NamedSharding(mesh, P())
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                              transform_non_params=lambda _: replicated,
                              is_leaf=lambda x: isinstance(x, NamedSharding))
  return {"step": replicated, "params": param_shardings, "opt_state": opt, "rng": replicated}


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """[accum, rows, seq]: rows by the `batch` rule, seq by the `seq` rule, accum never split."""
  from parallel.sharding import logical_to_spec

  spec = logical_to_spec((None, "batch", "seq"), rules, mesh)
  return NamedSharding(mesh, spec)


def compile_steps(graphdef, tx, abstract_state, state_shardings, batch_shape: tuple[int, int, int],
                  eval_shape: tuple[int, int, int], mesh: Mesh, rules, donate: bool = True):
  """jit + lower + compile the train and eval steps ahead of time; returns (train_fn, eval_fn).

  abstract_state: the TrainState as ShapeDtypeStructs (jax.eval_shape); shapes are [accum, rows, seq].
  """
  data_sharding = batch_sharding(mesh, rules)
  replicated = NamedSharding(mesh, P())
  sp_mesh = mesh if mesh.shape.get("sequence", 1) > 1 else None

  def batch_spec(shape):
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=data_sharding) for k in BATCH_FIELDS}

  abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                abstract_state, state_shardings)
  train_fn = jax.jit(lambda state, batch: train_step(graphdef, tx, state, batch, sp_mesh),
                     in_shardings=(state_shardings, data_sharding),
                     out_shardings=(state_shardings, replicated),
                     donate_argnums=(0,) if donate else ())
  eval_fn = jax.jit(lambda params, batch: eval_step(graphdef, params, batch, sp_mesh),
                    in_shardings=(state_shardings["params"], data_sharding), out_shardings=replicated)
  with expert_parallel(mesh):  # MoE blocks dispatch over the `expert` axis when it is > 1 (traced here)
    compiled_train = train_fn.lower(abstract_state, batch_spec(batch_shape)).compile()
    compiled_eval = eval_fn.lower(abstract_state["params"], batch_spec(eval_shape)).compile()
  return compiled_train, compiled_eval
