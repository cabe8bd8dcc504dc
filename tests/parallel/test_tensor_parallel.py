"""Megatron tensor parallelism for inference on the 8 forced host devices: a model loaded from an HF checkpoint
with GQA (kv_heads=2 below every tensor size but 2) and a vocabulary (130) no tensor size divides, on
tensor=2, 4, 8 and data=2 x tensor=4, gives the same greedy tokens as on one device, through the Engine and
through generate (both against the one-device Engine); parameters and KV pool are split per device as the rules say; the compiled decode step holds
the Megatron all-reduces and no all-gather of weights; bad meshes and checkpoints fail naming the field/tensor."""

import re

import jax
import numpy as np
import pytest

import jaxinfer
import testlib
from jaxinfer.checkpoint.hf import CheckpointError
from jaxinfer.config import ConfigError
from jaxinfer.engine.batch import StepBatch
from jaxinfer.models.sharding import check_model_mesh
from parallel.mesh import create_mesh

PROMPTS = [[5, 7, 9, 11, 3], [1, 2, 3], [100, 129, 4, 8, 15, 16]]
NEW = 4
LAYERS = 2
MESHES = {"tensor2": ({"tensor": 2, "data": 1}, 2), "tensor4": ({"tensor": 4, "data": 1}, 4),
          "tensor8": ({"tensor": 8, "data": 1}, 8), "data2_tensor4": ({"tensor": 4, "data": 2}, 8)}
ENGINE = dict(max_batch_size=4, page_size=8, num_pages=16, max_model_len=32, async_scheduling=False)


def _config(**overrides):
  fields = dict(vocab_size=130, num_heads=8, num_kv_heads=2, hidden_size=32, intermediate_size=64,
                num_layers=LAYERS)
  return testlib.tiny_model_config(**(fields | overrides))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("tp") / "ckpt"
  jaxinfer.save_hf(jaxinfer.init_model(_config(), seed=3), path)
  return path


@pytest.fixture(scope="module")
def reference(checkpoint):
  """Greedy tokens on one device (the Engine's; tests/engine/test_equivalence.py holds generate == Engine)."""
  model = jaxinfer.load_hf(checkpoint)
  return jaxinfer.Engine(model, **ENGINE).run(PROMPTS, jaxinfer.SamplingParams(), max_new_tokens=NEW)


def _device_bytes(arrays, device) -> int:
  return sum(s.data.nbytes for a in arrays for s in a.addressable_shards if s.device == device)


def _collectives(hlo: str) -> dict[str, list[str]]:
  ops = {}
  for line in hlo.splitlines():
    m = re.search(r"= (\S+) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\(", line)
    if m:
      ops.setdefault(m.group(2), []).append(m.group(1))
  return ops


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_model_matches_one_device(checkpoint, reference, name):
  section, n = MESHES[name]
  mesh = create_mesh(section, jax.devices()[:n])
  tensor = section["tensor"]
  model = jaxinfer.load_hf(checkpoint, mesh=mesh)

  # parameters: heads and mlp split 1/tensor; kv projections (2 heads < tensor) and the 130-row vocabulary
  # (when tensor does not divide it) replicated
  attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
  dev = mesh.devices.flat[0]
  for kernel in (attn.q_proj.kernel, attn.o_proj.kernel, mlp.gate_proj.kernel, mlp.down_proj.kernel):
    value = kernel.get_value()
    assert _device_bytes([value], dev) * tensor == value.nbytes, kernel
  kv = attn.k_proj.kernel.get_value()
  assert _device_bytes([kv], dev) * (tensor if tensor <= 2 else 1) == kv.nbytes
  emb = model.embed_tokens.embedding.get_value()
  assert _device_bytes([emb], dev) * (tensor if 130 % tensor == 0 else 1) == emb.nbytes

  engine = jaxinfer.Engine(model, **ENGINE)
  got = engine.run(PROMPTS, jaxinfer.SamplingParams(), max_new_tokens=NEW)
  assert got == reference
  # KV pool: each device holds 1/tensor of the pool, whose KV heads are repeated up to the tensor size
  pool = engine.runner.pool
  full = ENGINE["num_pages"] * ENGINE["page_size"] * 2 * model.config.resolved_head_dim * 4  # one layer's k
  repeat = max(1, tensor // 2)
  assert pool.k[0].nbytes == full * repeat
  assert _device_bytes(pool.k, dev) * tensor == sum(k.nbytes for k in pool.k)

  if name == "tensor4":
    runner = engine.runner
    shape = next(s for s, decode in runner._shapes_seen if decode)
    batch = StepBatch.empty(*shape, engine.pages_per_seq, runner.pool.num_slots)
    hlo = runner._steps[True].lower(runner.state_leaves, runner.pool, runner.table, runner.prev_sampled,
                                    batch).compile().as_text()
    ops = _collectives(hlo)
    # Megatron: one all-reduce after o_proj and one after down_proj per layer (XLA may add small ones for the
    # vocab-replicated embedding / sampling, never fewer)
    assert len(ops.get("all-reduce", [])) + len(ops.get("reduce-scatter", [])) >= 2 * LAYERS, ops
    weight_shapes = {f"[{','.join(map(str, v.shape))}]" for v in jax.tree.leaves(runner.state_leaves)
                     if v.ndim == 2}
    gathered = [s for s in ops.get("all-gather", []) if any(w in s for w in weight_shapes)]
    assert not gathered, gathered
  assert jaxinfer.generate(model, PROMPTS, NEW) == reference


def test_impossible_meshes_and_shapes_name_the_field(tmp_path):
  cfg = _config()
  with pytest.raises(ConfigError, match=r"mesh\.tensor: model num_heads=8"):
    check_model_mesh(cfg, {"tensor": 16})
  with pytest.raises(ConfigError, match=r"mesh\.tensor: model num_kv_heads=2"):
    check_model_mesh(_config(num_heads=6, num_kv_heads=2, hidden_size=48, intermediate_size=96), {"tensor": 3})
  with pytest.raises(ConfigError, match=r"mesh\.tensor: model intermediate_size=100"):
    check_model_mesh(_config(intermediate_size=100), {"tensor": 8})
  # a checkpoint whose MLP width does not divide over tensor=8: the first such tensor and its axis are named
  bad = tmp_path / "bad"
  jaxinfer.save_hf(jaxinfer.init_model(_config(intermediate_size=100, num_layers=1), seed=1), bad)
  mesh = create_mesh({"tensor": 8, "data": 1})
  with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight dimension \d "
                                            r"\('mlp', size 100\) is not divisible by mesh axes \('tensor',\)"):
    jaxinfer.load_hf(bad, mesh=mesh)


def test_init_model_on_a_mesh_equals_one_device():
  cfg = _config(num_layers=1)
  one = jaxinfer.init_model(cfg, seed=5)
  mesh = create_mesh({"tensor": 4, "data": 2})
  sharded = jaxinfer.init_model(cfg, seed=5, mesh=mesh)
  q = sharded.layers[0].self_attn.q_proj.kernel.get_value()
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
  for a, b in zip(jax.tree.leaves(_params(one)), jax.tree.leaves(_params(sharded)), strict=True):
    # the same random bits; the normal initialiser compiled under jit may round its last bit differently
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def _params(model):
  from flax import nnx

  return nnx.state(model, nnx.Param)


@pytest.mark.parametrize("override, message", [
    ("--config.mesh.tensor=3", "mesh.tensor: model num_heads=4 ('heads') is not divisible by tensor=3"),
    ("--config.mesh.tensor=16", "mesh.tensor: the mesh axes multiply to 16 (tensor=16) but there are 8 devices"),
])
def test_cli_impossible_mesh_fails_before_loading(capsys, override, message):
  from jaxinfer.cli import main
  from jaxinfer.engine import step as step_lib

  before = step_lib.compilation_count()
  assert main(["jaxinfer", "generate", "--config", "experiments/default.py", override]) == 2
  assert message in capsys.readouterr().err
  assert step_lib.compilation_count() == before
