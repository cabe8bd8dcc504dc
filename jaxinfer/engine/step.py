"""The engine step: ONE pure function of (model state, KV pool, page table, previous samples, StepBatch).

  sampled [max_rows], logprobs [max_rows], pool = engine_step(graphdef, state, pool, table, prev_sampled, batch)

Per step: the input tokens the host did not know yet (async scheduling) are taken from the previous step's
sampled vector; each sequence's page-table row is gathered from the device table; the model runs over the
ragged tokens with the paged cache, writing every new token's k/v at the slot the host mapped it to; the
lm_head runs only on the sampled rows (batch.sampling.rows, R of them, not the T token rows); one token and
its log-probability are drawn per sampled row. The outputs are padded to a fixed `max_rows` so that the next
step, whatever its shape, can read them.

The graph definition is static and closed over: ModelRunner jits `functools.partial(engine_step, graphdef)`
once per (graphdef, options), so no step hashes the graph again. Shapes are static (the host pads to
buckets, jaxinfer/engine/batch.py). The pool is donated, so the per-layer scatter updates it in place.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.engine.batch import StepBatch, buckets, pick_bucket  # noqa: F401  (re-exported)
from jaxinfer.engine.kv_pool import KVPool
from jaxinfer.engine.paged_cache import PagedKVCache, token_sequence
from jaxinfer.generation.sampling import row_keys, sample_tokens

log = logging.getLogger("jaxinfer.engine")

_compilations = {"count": 0}


def compilation_count() -> int:
  """How many engine step programs have been traced (and so compiled) in this process."""
  return _compilations["count"]


def engine_step(graphdef, state, pool: KVPool, table, prev_sampled, batch: StepBatch, head_leaves=None, *,
                max_rows: int, attention_impl=None, prefix_impl=None, interpret=False, decode_only=False,
                sharding=None, return_probs=False, policy_rule=None, row_head=None):
  _compilations["count"] += 1  # runs at trace time only
  t, s, r, g = batch.shape
  log.info("engine: compiling step program #%d (tokens=%d, seqs=%d, sampled rows=%d%s%s)", _compilations["count"],
           t, s, r, f", prefix groups={g}" if g else "", ", decode only" if decode_only else "")
  model = nnx.merge(graphdef, state)
  a, sm = batch.attn, batch.sampling
  tokens = jnp.where(batch.prev_index >= 0, prev_sampled[jnp.maximum(batch.prev_index, 0)], batch.tokens)
  cache = PagedKVCache(k_pages=pool.k, v_pages=pool.v, page_table=table[a.seq_slots], kv_lens=a.kv_lens,
                       cu_q_lens=a.cu_q_lens, num_seqs=a.num_seqs, slots=a.slot_mapping,
                       group_rows=a.group_rows, group_table=a.group_table, group_lens=a.group_lens,
                       seq_prefix_lens=a.seq_prefix_lens, attention_impl=attention_impl, prefix_impl=prefix_impl,
                       interpret=interpret, decode_only=decode_only, sharding=sharding, k_scales=pool.k_scales,
                       v_scales=pool.v_scales, policy=policy_step(pool, a, t, s), policy_rule=policy_rule,
                       tree_rows=a.tree_rows, tree_seqs=a.tree_seqs, tree_ctx=a.tree_ctx, tree_mask=a.tree_mask,
                       num_tree_rows=a.num_tree_rows)
  seq, valid = token_sequence(a.cu_q_lens, a.num_seqs, t)
  segment_ids = jnp.where(valid, seq, -1)[None]
  hidden, cache = model(tokens[None], a.positions[None], segment_ids, cache, return_hidden=True)
  logits = model.logits(hidden[0, sm.rows])  # [R, vocab]: the lm_head on the sampled rows only
  # a sampled token's stream depends only on its request's seed and its position, never on the batch
  keys = row_keys(sm.seeds, sm.positions)
  sampled = sample_tokens(logits, keys, sm.temperature, sm.top_k, sm.top_p, sm.min_p)
  logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), sampled[:, None], axis=-1)[:, 0]
  pool = pool.replace(k=cache.k_pages, v=cache.v_pages, k_scales=cache.k_scales,
                      v_scales=cache.v_scales).record_positions(a.slot_mapping, a.positions)
  if cache.policy is not None:
    pool = pool.replace(policy=cache.policy.state)
  pad = max_rows - r
  extras = {}  # optional per-row outputs, padded to max_rows like the samples
  if return_probs:  # speculative sampling: each row's whole distribution (jaxinfer/engine/speculative/probs.py)
    from jaxinfer.engine.speculative.probs import token_probs

    probs = token_probs(logits, sm.temperature, sm.top_k, sm.top_p, sm.min_p)
    extras["probs"] = jnp.pad(probs, ((0, pad), (0, 0)))
  if row_head is not None:  # e.g. Medusa heads on the sampled rows' hidden states (RowHead below)
    out = row_head.apply(head_leaves, hidden[0, sm.rows])
    extras["head"] = jnp.pad(out, ((0, pad),) + ((0, 0),) * (out.ndim - 1))
  return jnp.pad(sampled, (0, pad)), jnp.pad(logprobs, (0, pad)), pool, extras


class RowHead:
  """A module applied to the hidden states of a step's sampled rows, its output returned with the samples
  (Medusa's heads: the top-k guesses for the next tokens). Static (hashable by its graph and key) in the step;
  the module's parameters are passed to every step as `head_leaves`."""

  def __init__(self, module, output, key):
    self.graphdef, state = nnx.split(module)
    self.leaves, self.state_def = jax.tree.flatten(state)
    self.output = output  # (module, hidden [R, D]) -> array [R, ...]
    self.key = key  # what `output` computes: equal keys (and module graphs) share compiled programs

  def _identity(self):
    return (self.graphdef, self.state_def, self.key)

  def __hash__(self):
    return hash(self._identity())

  def __eq__(self, other):
    return isinstance(other, RowHead) and self._identity() == other._identity()

  def apply(self, leaves, hidden):
    module = nnx.merge(self.graphdef, jax.tree.unflatten(self.state_def, leaves))
    return self.output(module, hidden)


def policy_step(pool: KVPool, a, t: int, s: int):
  """The KV policy's inputs of this step (None without a policy); rows carry weight 0 unless the host said."""
  if pool.policy is None:
    return None
  from jaxinfer.engine.kv_policies.attention import PolicyStep

  weights = a.policy_weights if a.policy_weights is not None else jnp.zeros((t,), jnp.float32)
  reset = a.policy_reset if a.policy_reset is not None else jnp.zeros((s,), bool)
  return PolicyStep(state=pool.policy, seq_slots=a.seq_slots, weights=weights, reset=reset)


def update_table(table, slots, cols, pages):
  """table[slots[i], cols[i]] = pages[i]; padding entries carry an out-of-range slot (dropped)."""
  _compilations["table"] = _compilations.get("table", 0) + 1
  return table.at[slots, cols].set(pages, mode="drop")


def move_slots(pool: KVPool, src, dst) -> KVPool:
  """Slot dst[i] of every layer takes slot src[i]'s k/v (out-of-pool dst: dropped)."""
  _compilations["move"] = _compilations.get("move", 0) + 1
  return pool.move_slots(src, dst)


def copy_pages(pool: KVPool, src, dst) -> KVPool:
  """Copy-on-write: page dst[i] of every layer becomes a copy of page src[i] (out-of-pool dst: dropped)."""
  _compilations["copy"] = _compilations.get("copy", 0) + 1
  log.info("engine: compiling page-copy program (%d pages)", src.shape[0])
  return pool.copy_pages(src, dst)
