"""ModelRunner: owns the device side of the engine (model state, KV pool, page table) and dispatches steps.

  runner = ModelRunner(model, engine_config)
  inflight = runner.dispatch(built_step, copies)   # returns at once; the step runs on the device
  tokens, logprobs = inflight.fetch()              # host copies, started right after dispatch

The model is split once (nnx.split); the jitted step closes over its graph definition (built once per graph and
options and shared by engines of the same model), so no step hashes or re-traces the graph. Sampled tokens
are copied to the host asynchronously (copy_to_host_async) as soon as the step is dispatched; log-probabilities
only when a request in the step asked for them.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.engine import step as step_lib
from jaxinfer.engine.batch import BuiltStep, StepBatch, buckets, pick_bucket
from jaxinfer.engine.kv_pool import KVPool
from jaxinfer.engine.sharding import create_pool, engine_sharding, shard_policy_state, to_host

_JITTED: dict = {}  # (graphdef, options) -> jitted step; engines of one model share compiled programs


def _step_from_leaves(graphdef, state_def, state_leaves, *args, **kwargs):
  return step_lib.engine_step(graphdef, jax.tree.unflatten(state_def, state_leaves), *args, **kwargs)


def _jitted_step(graphdef, state_def, max_rows: int, attention_impl, prefix_impl, interpret: bool,
                 decode_only: bool, sharding=None, return_probs: bool = False, policy_rule=None, row_head=None):
  """The jitted step for one graph, closing over it (and over the state's tree structure: each call passes
  only the flat list of parameter arrays, so no step walks the NNX state either)."""
  key = (graphdef, state_def, max_rows, attention_impl, prefix_impl, interpret, decode_only, sharding,
         policy_rule, row_head) + (("probs",) if return_probs else ())
  fn = _JITTED.get(key)
  if fn is None:
    fn = jax.jit(functools.partial(_step_from_leaves, graphdef, state_def, max_rows=max_rows,
                                   attention_impl=attention_impl, prefix_impl=prefix_impl, interpret=interpret,
                                   decode_only=decode_only, sharding=sharding, policy_rule=policy_rule,
                                   row_head=row_head, **({"return_probs": True} if return_probs else {})),
                 donate_argnums=(1,))
    _JITTED[key] = fn
  return fn


_update_table = jax.jit(step_lib.update_table)
_copy_pages = jax.jit(step_lib.copy_pages, donate_argnums=(0,))
_move_slots = jax.jit(step_lib.move_slots, donate_argnums=(0,))


@dataclasses.dataclass
class InFlight:
  """A dispatched step: what was asked and the device arrays that will hold the answers."""
  built: BuiltStep
  sampled: jax.Array
  logprobs: jax.Array
  want_logprobs: bool
  probs: jax.Array | None = None  # [max_rows, vocab] when the step was asked for distributions (speculative)
  head: jax.Array | None = None  # [max_rows, ...] the row head's output (ModelRunner.row_head), if any

  def fetch_probs(self) -> np.ndarray | None:
    return None if self.probs is None else to_host(self.probs)

  def fetch_head(self) -> np.ndarray | None:
    return None if self.head is None else to_host(self.head)

  def fetch(self) -> tuple[np.ndarray, np.ndarray | None]:
    """Blocks until the step is done; (sampled tokens, log-probs or None if nobody asked)."""
    return to_host(self.sampled), (to_host(self.logprobs) if self.want_logprobs else None)


class ModelRunner:
  def __init__(self, model, cfg, *, max_rows: int, pages_per_seq: int, kv_policy=None, row_head=None,
               tree_pad: int = 0):
    self.model_config = model.config
    self.cfg = cfg
    self.graphdef, self.state = nnx.split(model)
    self.state_leaves, state_def = jax.tree.flatten(self.state)
    # a sharded model: the pool sharded by kv heads, attention per shard (jaxinfer/engine/sharding.py)
    self.sharding = engine_sharding(model)
    repeat = self.sharding.kv_repeat if self.sharding is not None else 1
    heads = None if kv_policy is None else kv_policy.layer_kv_heads(self.sharding)  # duo: retrieval heads only
    self.pool = create_pool(lambda: KVPool.create(model.config, cfg.num_pages, cfg.page_size,
                                                  cfg.kv_cache_dtype or cfg.kv_dtype,
                                                  track_positions=cfg.track_slot_positions, kv_repeat=repeat,
                                                  key_granularity=cfg.kv_quant_key_granularity,
                                                  layer_kv_heads=heads),
                            self.sharding)
    self.max_batch_size = cfg.max_batch_size
    self.table = jnp.zeros((cfg.max_batch_size, pages_per_seq), jnp.int32)
    if kv_policy is not None:  # its device state lives in the pool (jaxinfer/engine/kv_policies/attention.py)
      self.pool = self.pool.replace(policy=kv_policy.init_state(self.pool.num_slots, cfg.max_batch_size,
                                                                pages_per_seq * cfg.page_size))
      self.pool = shard_policy_state(self.pool, self.sharding)  # split on kv heads like the pages
    policy_rule = kv_policy.rule if kv_policy is not None else None
    self.kv_policy = kv_policy
    self.max_rows = max_rows
    self.prev_sampled = jnp.zeros((max_rows,), jnp.int32)
    # decode-only steps (one token per sequence, no prefix groups) have programs of their own (decode kernel)
    self.row_head = row_head  # step.RowHead: a module on the sampled rows' hidden states (Medusa heads)
    self._head_args = () if row_head is None else (row_head.leaves,)
    self._steps = {flag: _jitted_step(self.graphdef, state_def, max_rows, cfg.attention_impl, cfg.shared_prefix_impl,
                                      cfg.interpret, flag, self.sharding, policy_rule=policy_rule, row_head=row_head)
                   for flag in (False, True)}
    self.copy_buckets = buckets(1, cfg.max_batch_size)
    self.move_buckets = buckets(4, max(4, max_rows))
    self.tree_pad = tree_pad  # tree members per step (BatchBuilder.tree_pad): empty steps carry them too
    self.update_buckets = buckets(min(16, cfg.max_batch_size * pages_per_seq), cfg.max_batch_size * pages_per_seq)
    self.compile_seconds = 0.0
    self._shapes_seen: set = set()
    self._state_def = state_def
    self._prob_steps: dict = {}  # decode_only -> step that also returns each row's distribution (speculative)

  # ------------------------------------------------------------------ device-side bookkeeping
  def apply_table_update(self, update) -> None:
    if update is None:
      return
    n = pick_bucket(len(update.slots), self.update_buckets)
    slots = np.full((n,), self.max_batch_size, np.int32)  # padding: out of the table, dropped
    cols, pages = np.zeros((n,), np.int32), np.zeros((n,), np.int32)
    k = len(update.slots)
    slots[:k], cols[:k], pages[:k] = update.slots, update.cols, update.pages
    self.table = _update_table(self.table, slots, cols, pages)

  def copy_pages(self, copies: list[tuple[int, int]]) -> None:
    """Copy-on-write before the step: page src into page dst in every layer (one small jitted program)."""
    n = pick_bucket(len(copies), self.copy_buckets)
    src = np.zeros((n,), np.int32)
    dst = np.full((n,), self.cfg.num_pages, np.int32)  # padding: out of the pool, dropped
    src[:len(copies)], dst[:len(copies)] = zip(*copies)
    self.pool = _copy_pages(self.pool, src, dst)

  def table_view(self, pages_per_seq: int | None):
    """The device page table as a step program of that width reads it: the first pages_per_seq columns
    (the persistent table stays full width; a narrow step reads a slice of it)."""
    if pages_per_seq is None or pages_per_seq == self.table.shape[1]:
      return self.table
    return self.table[:, :pages_per_seq]

  # ------------------------------------------------------------------ steps
  def run_empty(self, shape, pages_per_seq: int, decode_only: bool = False) -> None:
    """Compiles (and runs) the program of one step shape on a batch of padding: nothing is written."""
    batch = StepBatch.empty(*shape, pages_per_seq, self.pool.num_slots, self.tree_pad)
    if self.kv_policy is not None:  # the policy's own arrays (its scores' row weights): the real steps' structure
      batch = batch.replace(attn=batch.attn.replace(**self.kv_policy.step_arrays(shape[0], shape[1])))
    step = self._steps[decode_only]
    sampled, _, self.pool, _ = step(self.state_leaves, self.pool, self.table_view(pages_per_seq), self.prev_sampled,
                                    batch, *self._head_args)
    sampled.block_until_ready()

  def maybe_compile_apart(self, shape, pages_per_seq: int, decode_only: bool = False) -> None:
    """separate_compile: the first step of each shape is compiled in an empty step, timed apart."""
    full = pages_per_seq in (None, self.table.shape[1])  # a narrow table's programs are keyed by their width too
    key = (shape, decode_only) if full else (shape, decode_only, pages_per_seq)
    if key in self._shapes_seen:
      return
    self._shapes_seen.add(key)
    if self.cfg.separate_compile:
      start = time.perf_counter()
      self.run_empty(shape, pages_per_seq, decode_only)
      self.compile_seconds += time.perf_counter() - start

  def dispatch(self, built: BuiltStep, copies, want_logprobs: bool, want_probs: bool = False) -> InFlight:
    if copies:
      self.copy_pages(copies)
    self.apply_table_update(built.table_update)
    step = self._prob_step(built.decode_only) if want_probs else self._steps[built.decode_only]
    sampled, logprobs, self.pool, extras = step(self.state_leaves, self.pool, self.table_view(built.table_pages),
                                                self.prev_sampled, built.batch, *self._head_args)
    self.prev_sampled = sampled
    for array in (sampled, *extras.values()) + ((logprobs,) if want_logprobs else ()):
      array.copy_to_host_async()
    return InFlight(built, sampled, logprobs, want_logprobs, extras.get("probs"), extras.get("head"))

  def _prob_step(self, decode_only: bool):
    """The step program that also returns every sampled row's distribution (speculative sampling)."""
    step = self._prob_steps.get(decode_only)
    if step is None:
      cfg = self.cfg
      step = self._prob_steps[decode_only] = _jitted_step(
          self.graphdef, self._state_def, self.max_rows, cfg.attention_impl, cfg.shared_prefix_impl, cfg.interpret,
          decode_only, self.sharding, return_probs=True, row_head=self.row_head)
    return step

  def move_slots(self, moves: list[tuple[int, int]]) -> None:
    """Slot dst takes slot src's k/v in every layer, all read before any is written (the accepted path of a
    candidate tree moving to its positions); one small jitted program per bucket of moves."""
    n = pick_bucket(len(moves), self.move_buckets)
    src = np.zeros((n,), np.int32)
    dst = np.full((n,), self.pool.num_slots, np.int32)  # padding: out of the pool, dropped
    src[:len(moves)], dst[:len(moves)] = zip(*moves)
    self.pool = _move_slots(self.pool, src, dst)
