"""KV policies on a Megatron tensor-parallel model (8 forced host devices): every policy on tensor=2 (H2O on
tensor=2 x data=2, SnapKV on an int8 pool) against the same engine on one device with the same float32
checkpoint: greedy tokens identical, log p within 1e-4 (1e-3 on int8), and the slots each (layer, kv head)
keeps after every step identical; the pool's pages, scales and the policy's state stay split on kv heads after
the compactions; the compiled compaction and eviction programs hold no collective (each shard moves its own
heads only) and no collective of the step program returns a whole pool, position or score array."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

import jaxinfer
from jaxinfer.engine.batch import StepBatch
from jaxinfer.engine.kv_policies import KVPolicyConfig
from jaxinfer.engine.kv_policies import device as D
from jaxinfer.generation.sampling import SamplingParams
from parallel.mesh import create_mesh
from testlib import tiny_model_config

PS, STEP, PROMPT, NEW = 8, 16, 16, 12  # the prompt fills one step: one step shape per engine
LOGPROB_ATOL = 1e-4
# int8: the two engines' k/v agree to ~1e-6 (summation order), not bitwise, so a code on a rounding boundary
# may land one step apart (a step is absmax / 127 of its page and channel)
INT8_LOGPROB_ATOL = 1e-3
MESHES = {"tensor2": {"tensor": 2, "data": 1}, "tensor2_data2": {"tensor": 2, "data": 2}}
POLICIES = {
    "streaming": dict(name="streaming", sink_tokens=4, window=8),
    "snapkv": dict(name="snapkv", window=4, budget=10),
    "h2o": dict(name="h2o", window=4, budget=10),
    "h2o_unscored": dict(name="h2o_unscored", window=4, budget=10),
    "duo_masked": dict(name="duo_masked", sink_tokens=4, window=8, head_classes=("rs", "sr")),
}
CASES = [  # (policy, mesh, kv_cache_dtype): every policy on tensor=2, H2O on tensor=2 x data=2, and SnapKV on an
    # int8 pool with per-channel keys (its compaction requantizes them; its decode kernel reads the scales)
    ("streaming", "tensor2", None), ("snapkv", "tensor2", "int8"), ("h2o", "tensor2_data2", None),
    ("h2o_unscored", "tensor2", None), ("duo_masked", "tensor2", None),
]
COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\(")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("kvtp") / "ckpt"
  cfg = tiny_model_config(dtype="float32", initializer_range=0.05)  # 4 heads, 2 kv heads: one per shard
  jaxinfer.save_hf(jaxinfer.init_model(cfg, seed=7), path)
  return path


@pytest.fixture(scope="module")
def models(checkpoint):
  out = {"one": jaxinfer.load_hf(checkpoint)}
  for name, section in MESHES.items():
    n = section["tensor"] * section["data"]
    out[name] = jaxinfer.load_hf(checkpoint, mesh=create_mesh(section, jax.devices()[:n]))
  return out


def _run(model, policy, dtype, prompts):
  """Greedy tokens and log p per prompt, and after every step the positions each (layer, kv head) holds."""
  # one step program (every step padded to STEP tokens), except SnapKV: its decode-only steps take the paged
  # kernel (per shard), so they get their own program
  bucket = None if policy.name == "snapkv" else STEP
  engine = jaxinfer.Engine(model, max_batch_size=2, page_size=PS, max_step_tokens=STEP, min_token_bucket=bucket,
                           max_model_len=128, async_scheduling=False, kv_policy=policy, kv_cache_dtype=dtype)
  rids = [engine.add_request(p, SamplingParams(logprobs=True), max_new_tokens=NEW) for p in prompts]
  out, logp, kept = {r: [] for r in rids}, {r: [] for r in rids}, []
  while engine.has_unfinished():
    for o in engine.step():
      out[o.request_id] += o.new_token_ids
      logp[o.request_id] += o.logprobs
    for r in rids:
      request = engine._requests.get(r)
      if request is not None and r in engine.kv_policy.held:  # running (a waiting request holds nothing)
        kept.append((r, request.num_computed, D.kept_positions(engine.runner.pool, request.pages,
                                                               engine.kv_policy.held[r])))
  engine.check_pages()
  return [out[r] for r in rids], [np.asarray(logp[r]) for r in rids], kept, engine


def _split_on_kv_heads(x, axis: int, tensor: int):
  spec = tuple(x.sharding.spec) + (None,) * x.ndim
  assert spec[axis] in ("tensor", ("tensor",)) and all(s is None for i, s in enumerate(spec[:x.ndim]) if i != axis)
  dev = x.sharding.mesh.devices.flat[0]
  assert sum(s.data.nbytes for s in x.addressable_shards if s.device == dev) * tensor == x.nbytes


def _assert_no_collectives(jitted, *args, **kw):
  hlo = jitted.lower(*args, **kw).compile().as_text()
  found = [m.group(1) for m in COLLECTIVE.finditer(hlo)]
  assert not found, found


@pytest.mark.parametrize("case,mesh,dtype", CASES, ids=[f"{c}-{m}-{d or 'float'}" for c, m, d in CASES])
def test_policy_on_tensor_parallel_model_matches_one_device(models, case, mesh, dtype):
  policy = KVPolicyConfig(**POLICIES[case])
  rng = np.random.default_rng(len(case) + len(mesh))
  vocab = models["one"].config.vocab_size
  prompts = [rng.integers(1, vocab, PROMPT).tolist()]
  want, want_logp, want_kept, _ = _run(models["one"], policy, dtype, prompts)
  got, got_logp, got_kept, engine = _run(models[mesh], policy, dtype, prompts)

  assert got == want
  for g, w in zip(got_logp, want_logp):
    np.testing.assert_allclose(g, w, atol=LOGPROB_ATOL if dtype is None else INT8_LOGPROB_ATOL, rtol=0)
  print(f"{case} {mesh} {dtype or 'float'}: max |log p diff| "
        f"{max(float(np.abs(g - w).max()) for g, w in zip(got_logp, want_logp)):.2e}")
  assert len(got_kept) == len(want_kept)
  for (rg, ng, pg), (rw, nw, pw) in zip(got_kept, want_kept):
    assert (rg, ng) == (rw, nw)
    np.testing.assert_array_equal(pg, pw, err_msg=f"request {rg} after {ng} tokens")
  if case != "duo_masked":  # the policy did evict (duo_masked only masks its streaming heads)
    assert any((p < 0).any() or p.shape[-1] < n for _, n, p in want_kept)

  # after the run (compactions / evictions included): pages, scales and policy state split on kv heads
  pool, stats = engine.runner.pool, engine.kv_policy.stats
  if case in ("snapkv", "h2o", "h2o_unscored"):
    assert stats["compactions"] >= 1
  if case == "snapkv":
    assert any(decode for _, decode in engine.runner._shapes_seen)  # the paged decode kernel ran
  if case == "streaming":
    assert stats["evicted_pages"] >= 1
  for arrays, axis in ((pool.k, 2), (pool.v, 2), (pool.k_scales or (), 2), (pool.v_scales or (), 2),
                       (pool.policy.slot_pos, 1), (pool.policy.score, 2)):
    for x in arrays:
      _split_on_kv_heads(x, axis, MESHES[mesh]["tensor"])
  assert pool.quantized == (dtype is not None)

  if case == "h2o":  # the compiled device programs on the sharded pool: no collective, outputs split alike
    width = engine.runner.table.shape[1] * PS
    slots = np.arange(width, dtype=np.int32)
    heads = D.pool_heads(pool)
    assert heads is not None
    _assert_no_collectives(D._compact, pool, np.int32(0), slots, slots[:10], np.int32(20), np.int32(20),
                           select=engine.kv_policy.prefill_select, keep=10, heads=heads)
    _assert_no_collectives(D._h2o_evict, pool, np.int32(0), slots, np.int32(20), np.int32(20), window=4,
                           heads=heads)
    # the step program: no collective returns a whole pool, slot-position or score array
    runner = engine.runner
    whole = {f"[{','.join(map(str, x.shape))}]" for x in (pool.k[0], pool.policy.slot_pos[0], pool.policy.score[0])}
    assert runner._shapes_seen
    for key in runner._shapes_seen:  # (shape, decode_only) or, on the narrow page table, (..., width)
      shape, decode = key[:2]
      width = key[2] if len(key) > 2 else engine.pages_per_seq
      batch = StepBatch.empty(*shape, width, pool.num_slots)
      batch = batch.replace(attn=batch.attn.replace(**engine.kv_policy.step_arrays(shape[0], shape[1])))
      hlo = runner._steps[decode].lower(runner.state_leaves, pool, runner.table_view(width), runner.prev_sampled,
                                        batch).compile().as_text()
      moved = [line for line in hlo.splitlines() if COLLECTIVE.search(line) and any(w in line for w in whole)]
      assert not moved, moved


def test_policy_on_pool_with_repeated_kv_heads_is_refused(models, checkpoint):
  """tensor=4 over 2 kv heads: the pool repeats each kv head twice, the policy state has one column per
  model kv head; refused naming the field."""
  from jaxinfer.config import ConfigError

  model = jaxinfer.load_hf(checkpoint, mesh=create_mesh({"tensor": 4, "data": 1}, jax.devices()[:4]))
  with pytest.raises(ConfigError, match=r"engine\.kv_policy\.name: a KV policy on a model sharded over \('tensor',\) "
                                        r"\(size 4\) needs num_kv_heads=2 divisible"):
    jaxinfer.Engine(model, max_batch_size=2, page_size=PS, max_model_len=64, kv_policy=KVPolicyConfig(
        **POLICIES["streaming"]))


def test_realised_duo_on_tensor_parallel_model(models):
  """duo's pages (retrieval heads) and store (streaming heads) split on kv heads: a layer all retrieval and one
  all streaming give each shard an equal share and match one device; head classes that do not split evenly
  over the shards are refused, pointing to duo_masked."""
  from jaxinfer.config import ConfigError

  policy = KVPolicyConfig(name="duo", sink_tokens=4, window=8, head_classes=("rr", "ss"))
  prompts = [np.random.default_rng(3).integers(1, models["one"].config.vocab_size, PROMPT).tolist()]
  want, want_logp, _ = _run_plain(models["one"], policy, prompts)
  got, got_logp, engine = _run_plain(models["tensor2"], policy, prompts)
  assert got == want
  np.testing.assert_allclose(got_logp[0], want_logp[0], atol=LOGPROB_ATOL, rtol=0)
  pool = engine.runner.pool
  assert [k.shape[2] for k in pool.k] == [2, 0] and [x.shape[2] for x in pool.policy.store_k] == [0, 2]
  for x in pool.k + pool.v + pool.policy.store_k + pool.policy.store_v:
    if x.size:  # (a layer with no head of a kind holds an empty array, whatever its sharding)
      _split_on_kv_heads(x, 2, 2)
  uneven = KVPolicyConfig(**(POLICIES["duo_masked"] | {"name": "duo"}))
  with pytest.raises(ConfigError, match=r"^engine\.kv_policy\.name: duo .*name='duo_masked'"):
    jaxinfer.Engine(models["tensor2"], max_batch_size=2, page_size=PS, max_model_len=64, kv_policy=uneven)


def _run_plain(model, policy, prompts):
  engine = jaxinfer.Engine(model, max_batch_size=2, page_size=PS, max_step_tokens=STEP, min_token_bucket=STEP,
                           max_model_len=128, async_scheduling=False, kv_policy=policy)
  rids = [engine.add_request(p, SamplingParams(logprobs=True), max_new_tokens=NEW) for p in prompts]
  out, logp = {r: [] for r in rids}, {r: [] for r in rids}
  while engine.has_unfinished():
    for o in engine.step():
      out[o.request_id] += o.new_token_ids
      logp[o.request_id] += o.logprobs
  engine.check_pages()
  return [out[r] for r in rids], [np.asarray(logp[r]) for r in rids], engine
