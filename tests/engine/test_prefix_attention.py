"""Shared-prefix (Hydragen) attention in the engine: the scheduler groups decodes by shared prefix pages into
contiguous rows, and a windowed model gives generate's tokens through the grouped path too."""

import numpy as np
import pytest

import jaxinfer
from jaxinfer.engine import Engine, PageAllocator
from jaxinfer.engine.request import Request
from jaxinfer.engine.scheduler import PrefixGroup, ScheduledSeq, Scheduler
from jaxinfer.generation.sampling import SamplingParams

from testlib import tiny_model_config

CFG = tiny_model_config()


def _seq(rid, pages, start, num_tokens=1):
  r = Request(request_id=rid, prompt=[0] * (start + num_tokens), sampling=SamplingParams(), max_new_tokens=1,
              stop_token_ids=frozenset(), arrival=rid)
  r.pages = list(pages)
  return ScheduledSeq(r, num_tokens, start)


def test_scheduler_groups_decodes_by_shared_pages_into_contiguous_rows():
  sch = Scheduler(PageAllocator(64), page_size=4, max_batch_size=16, max_step_tokens=64, group_prefixes=True,
                  max_prefix_groups=3)
  seqs = [
      _seq(0, [1, 2, 3, 4, 5, 40], 21),  # a tree: 1 2 | 3 4 5 for 0, 2, 5; 7 8 for 3, 6
      _seq(1, [30, 31, 32], 9),  # alone
      _seq(2, [1, 2, 3, 4, 5, 41], 22),
      _seq(3, [1, 2, 7, 8, 42], 17),
      _seq(4, [1, 2, 3, 4, 5, 6, 43], 26, num_tokens=3),  # prefilling: takes the normal path
      _seq(5, [1, 2, 3, 4, 9, 44], 20),
      _seq(6, [1, 2, 7, 8, 45], 16),
      _seq(7, [50, 51, 52], 10),  # shares page 50 with 8 only
      _seq(8, [50, 53], 5),
      _seq(9, [60, 61], 2),  # a decode whose first page is not full yet: nothing to share
  ]
  ordered, groups = sch._group(seqs)
  ids = [s.request.request_id for s in ordered]
  # bucket of page 1, reference 2 (longest): 0 shares 5 pages, 5 shares 4, 3 and 6 share 2 -> 5 pages with
  # {2, 0} saves 5, 4 pages with {2, 0, 5} saves 8, 2 pages with all five saves 8 (ties go to the longer);
  # then {3, 6} share 4 pages (1 2 7 8); then {7, 8} share 1 page
  assert groups == [PrefixGroup(0, 3, 4), PrefixGroup(3, 2, 4), PrefixGroup(5, 2, 1)]
  assert ids[:7] == [0, 2, 5, 3, 6, 7, 8]
  assert ids[7:] == [1, 4, 9]  # the rest keep their order
  for g in groups:  # contiguous rows, the same physical pages at the start of each member's table
    members = ordered[g.first:g.first + g.num_seqs]
    assert len({tuple(s.request.pages[:g.num_pages]) for s in members}) == 1
    assert all(s.num_tokens == 1 and s.start >= g.num_pages * 4 for s in members)
  # at most max_prefix_groups groups (largest savings first); a minimum prefix length
  sch.max_prefix_groups = 1
  assert sch._group(seqs)[1] == [PrefixGroup(0, 3, 4)]
  sch.max_prefix_groups, sch.min_shared_prefix_pages = 3, 3
  assert sch._group(seqs)[1] == [PrefixGroup(0, 3, 4), PrefixGroup(3, 2, 4)]


def test_settings_are_checked(model):
  with pytest.raises(ValueError, match="needs enable_prefix_caching=True"):
    Engine(model, max_batch_size=4, num_pages=16, enable_shared_prefix_attention=True)
  with pytest.raises(ValueError, match="shared_prefix_impl='pallas_gpu' is not one of"):
    Engine(model, max_batch_size=4, num_pages=16, enable_prefix_caching=True, shared_prefix_impl="pallas_gpu")
  with pytest.raises(ValueError, match="max_prefix_groups must be a positive integer"):
    Engine(model, max_batch_size=4, num_pages=16, max_prefix_groups=0)


def test_sliding_window_model_through_shared_prefix_attention_matches_generate():
  """A window of 5 tokens is shorter than the shared prefix: the prefix part must hide what the window hides."""
  model = jaxinfer.init_model(CFG.replace(sliding_window=5), seed=11)
  rng = np.random.default_rng(2)
  base = rng.integers(0, CFG.vocab_size, size=18).tolist()
  prompts = [base + rng.integers(0, CFG.vocab_size, size=n).tolist() for n in (1, 4, 2, 6)]
  expected = [jaxinfer.generate(model, [p], 8)[0] for p in prompts]
  engine = Engine(model, max_batch_size=4, page_size=4, num_pages=32, max_step_tokens=16, min_token_bucket=16,
                  max_prefix_groups=1, enable_prefix_caching=True, enable_shared_prefix_attention=True)
  assert engine.run(prompts[:1], max_new_tokens=8, progress=False) == expected[:1]
  assert engine.run(prompts[1:], max_new_tokens=8, progress=False) == expected[1:]
  assert engine.stats["shared_prefix_groups"] > 0 and engine.prefix_stats["hit_tokens"] >= 3 * 16
  assert engine.check_pages()["in_use"] == 0
