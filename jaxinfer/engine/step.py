"""The engine step: ONE jitted pure function of (graphdef, state, k/v pools, step arrays).

Static: the model graph, the paged-attention implementation, and the shapes, which the host pads to a few
buckets (token count, sequence count) so a serving loop compiles a bounded number of programs. Dynamic:
tokens, positions, the ragged layout (cu_q_lens, kv_lens, page table, num_seqs) and per-sequence sampling
parameters. The pools are donated, so the per-layer scatter of new k/v updates them in place.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.engine.paged_cache import PagedKVCache, token_sequence
from jaxinfer.generation.sampling import row_keys, sample_tokens

log = logging.getLogger("jaxinfer.engine")

_compilations = {"count": 0}

# names of the per-step arrays (a dict of them is the step's `batch` argument)
STEP_FIELDS = ("tokens", "positions", "cu_q_lens", "kv_lens", "page_table", "num_seqs", "temperature", "top_k",
               "top_p", "min_p", "seeds")
# present only in steps that run shared-prefix attention (their own programs, one per group-count bucket)
GROUP_FIELDS = ("group_rows", "group_table", "group_lens", "seq_prefix_lens")


def compilation_count() -> int:
  """How many engine step programs have been traced (and so compiled) in this process."""
  return _compilations["count"]


def buckets(minimum: int, maximum: int) -> tuple[int, ...]:
  """Powers of two from `minimum` below `maximum`, then `maximum` itself."""
  sizes, b = [], minimum
  while b < maximum:
    sizes.append(b)
    b *= 2
  return tuple(sizes) + (maximum,)


def pick_bucket(n: int, sizes: tuple[int, ...]) -> int:
  for size in sizes:
    if n <= size:
      return size
  raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")


@functools.partial(jax.jit, static_argnames=("graphdef", "attention_impl", "prefix_impl", "interpret"),
                   donate_argnames=("k_pages", "v_pages"))
def engine_step(graphdef, state, k_pages, v_pages, batch, *, attention_impl=None, prefix_impl=None,
                interpret=False):
  """Runs the model over the step's ragged tokens, writes their k/v into the pools and samples one token
  per sequence from the logits of its last row. Returns (tokens [S], logprobs [S], k_pages, v_pages);
  rows of sequences that are mid-prefill (or padding) are ignored by the host. With the GROUP_FIELDS in
  `batch`, the decode rows of each prefix group attend over their shared prefix once (Hydragen)."""
  _compilations["count"] += 1  # runs at trace time only
  num_tokens, num_seqs = batch["tokens"].shape[0], batch["kv_lens"].shape[0]
  groups = batch["group_lens"].shape[0] if "group_lens" in batch else 0
  log.info("engine: compiling step program #%d (tokens=%d, seqs=%d%s)", _compilations["count"], num_tokens,
           num_seqs, f", prefix groups={groups}" if groups else "")
  model = nnx.merge(graphdef, state)
  cache = PagedKVCache(k_pages=k_pages, v_pages=v_pages, page_table=batch["page_table"], kv_lens=batch["kv_lens"],
                       cu_q_lens=batch["cu_q_lens"], num_seqs=batch["num_seqs"], attention_impl=attention_impl,
                       prefix_impl=prefix_impl, interpret=interpret,
                       **{name: batch[name] for name in GROUP_FIELDS if name in batch})
  seq, valid = token_sequence(batch["cu_q_lens"], batch["num_seqs"], num_tokens)
  segment_ids = jnp.where(valid, seq, -1)[None]
  logits, cache = model(batch["tokens"][None], batch["positions"][None], segment_ids, cache)
  last_rows = jnp.clip(batch["cu_q_lens"][1:] - 1, 0, num_tokens - 1)
  last = logits[0, last_rows]  # [S, vocab] float32
  # the sampled token takes position kv_len: its stream depends only on the request's seed and that position
  keys = row_keys(batch["seeds"], batch["kv_lens"])
  tokens = sample_tokens(last, keys, batch["temperature"], batch["top_k"], batch["top_p"], batch["min_p"])
  logprobs = jnp.take_along_axis(jax.nn.log_softmax(last, axis=-1), tokens[:, None], axis=-1)[:, 0]
  return tokens, logprobs, cache.k_pages, cache.v_pages


@functools.partial(jax.jit, donate_argnames=("k_pages", "v_pages"))
def copy_pages(k_pages, v_pages, src, dst):
  """Copy-on-write: page dst[i] of every layer's k and v pool becomes a copy of page src[i]. Padding entries
  carry an out-of-pool dst (dropped). The host pads src/dst to a power-of-two length, so few programs."""
  _compilations["copy"] = _compilations.get("copy", 0) + 1
  log.info("engine: compiling page-copy program (%d pages)", src.shape[0])
  k_pages = tuple(kp.at[dst].set(kp[src], mode="drop") for kp in k_pages)
  v_pages = tuple(vp.at[dst].set(vp[src], mode="drop") for vp in v_pages)
  return k_pages, v_pages
