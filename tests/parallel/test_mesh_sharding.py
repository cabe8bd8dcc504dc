"""Meshes from config, logical-axis rules, and one training step on 8 host devices vs a single device.

Tolerances (float32 compute, highest matmul precision): loss within 2e-6 relative, every gradient within
1e-6 absolute (gradients are O(1e-2)); the sharded programs only reorder float sums.
"""

import math

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from jaxinfer.data.packing import Split
from jaxinfer.models import ModelConfig, init_model
from jaxinfer.train import create_sharded_model
from jaxinfer.train.step import batch_sharding, loss_and_grads
from parallel.layouts import LAYOUTS
from parallel.mesh import MESH_AXES, MeshConfig, ParallelConfigError, create_mesh, resolve_mesh_shape
from parallel.sharding import (DEFAULT_RULES, RULE_PRESETS, logical_to_spec, normalize_rules, rules_preset,
                               state_partition_specs)

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                  num_kv_heads=4, max_position_embeddings=128)
LOSS_RTOL, GRAD_ATOL = 2e-6, 1e-6


# ------------------------------------------------------------------------------------------------ meshes
def test_mesh_sizes_resolve_minus_one_and_keep_every_axis():
  assert resolve_mesh_shape(MeshConfig(), 8)["data"] == 8
  sizes = resolve_mesh_shape(MeshConfig(tensor=4), 8)
  assert sizes["data"] == 2 and sizes["tensor"] == 4
  assert resolve_mesh_shape({"fsdp": -1, "sequence": 2}, 8)["fsdp"] == 4
  mesh = create_mesh(MeshConfig(fsdp=2, tensor=2, sequence=2))
  assert mesh.axis_names == MESH_AXES and mesh.size == 8
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  assert dict(mesh.shape) == {"data": 1, "stage": 1, "fsdp": 2, "expert": 1, "sequence": 2, "tensor": 2}
  explicit = create_mesh(MeshConfig(data=8), axis_type=AxisType.Explicit)
  assert all(t == AxisType.Explicit for t in explicit.axis_types)


@pytest.mark.parametrize("sizes, field, message", [
    (dict(data=3), "mesh.data", "multiply to 3"),
    (dict(data=2, tensor=2), "mesh.data", "multiply to 4"),
    (dict(data=-1, fsdp=-1), "mesh.fsdp", "at most one axis may be -1"),
    (dict(data=-1, tensor=3), "mesh.data", "does not divide the 8 devices"),
    (dict(data=4, stage=2), "mesh.stage", "reserved"),
    (dict(data=8, tensor=0), "mesh.tensor", "positive integer or -1"),
    (dict(data=8, dcn_data=3), "mesh.dcn_data", "divisor"),
    (dict(data=8, pipeline=2), "mesh.pipeline", "unknown mesh field"),
])
def test_impossible_meshes_name_the_axis(sizes, field, message):
  with pytest.raises(ParallelConfigError, match=rf"^{field}: .*{message}"):
    resolve_mesh_shape(sizes, 8)


def test_dcn_split_needs_as_many_hosts():
  # one process is one DCN granule: a DCN axis of 2 cannot be laid out (test_multihost builds one over 2)
  with pytest.raises(ParallelConfigError, match=r"^mesh.dcn_data: cannot split"):
    create_mesh(MeshConfig(data=2, fsdp=4, dcn_data=2))


# ------------------------------------------------------------------------------------------------ rules
def test_logical_to_spec_drops_size_one_and_reused_axes():
  mesh = create_mesh(MeshConfig(fsdp=2, tensor=4, data=1))
  assert logical_to_spec(("embed", "mlp"), DEFAULT_RULES, mesh) == P("fsdp", "tensor")
  assert logical_to_spec(("batch", "seq"), DEFAULT_RULES, mesh) == P("fsdp")  # data and sequence are size 1
  assert logical_to_spec(("batch", "seq", "embed"), DEFAULT_RULES, mesh) == P("fsdp")  # fsdp used once
  assert logical_to_spec(("norm",), DEFAULT_RULES, mesh) == P()
  data_mesh = create_mesh(MeshConfig(data=8))
  assert logical_to_spec(("embed", "mlp"), DEFAULT_RULES, data_mesh) == P()  # pure data parallel: replicated


def test_indivisible_dimension_and_unknown_names_are_clear_errors():
  mesh = create_mesh(MeshConfig(tensor=8, data=1))
  with pytest.raises(ParallelConfigError, match=r"layers.0.mlp.gate_proj.kernel dimension 1 \('mlp', size 12\) "
                                                r"is not divisible by mesh axes \('tensor',\) of total size 8"):
    logical_to_spec(("embed", "mlp"), DEFAULT_RULES, mesh, shape=(16, 12), name="layers.0.mlp.gate_proj.kernel")
  with pytest.raises(ParallelConfigError, match="no rule for logical axis 'experts'"):
    logical_to_spec(("experts",), DEFAULT_RULES, mesh)
  with pytest.raises(ParallelConfigError, match=r"sharding_rules\[1\]: 'embed' -> unknown mesh axis 'model'"):
    normalize_rules([("batch", "data"), ("embed", "model")])
  with pytest.raises(ParallelConfigError, match="appears twice"):
    normalize_rules([("batch", "data"), ("batch", None)])
  with pytest.raises(ParallelConfigError, match="unknown preset"):
    rules_preset("zero")


def test_presets_are_complete_rule_tables():
  for name, rules in RULE_PRESETS.items():
    table = normalize_rules(rules)
    assert {"batch", "seq", "embed", "heads", "kv_heads", "mlp", "vocab", "norm"} <= set(table), name
  mesh = create_mesh(MeshConfig(fsdp=8, data=1))
  abstract = nnx.split(nnx.eval_shape(lambda: init_model(CFG)))[1]
  fsdp = state_partition_specs(abstract, rules_preset("fsdp"), mesh)
  assert fsdp["layers"][0]["mlp"]["down_proj"]["kernel"].get_value() == P(None, "fsdp")
  data = state_partition_specs(abstract, rules_preset("data"), mesh)
  assert data["layers"][0]["mlp"]["down_proj"]["kernel"].get_value() == P()


# ------------------------------------------------------------------------------------------------ one step
@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  lengths = rng.integers(5, 40, size=40)
  starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  split = Split(rng.integers(1, 256, size=starts[-1]).astype(np.uint16), starts, 32)
  rows = split.rows(np.arange(8))
  return {k: v.reshape(1, 8, 32) for k, v in rows.items()}


def one_step(mesh, batch, layout="contiguous"):
  rules = normalize_rules(DEFAULT_RULES)
  model, shardings = create_sharded_model(CFG, mesh, rules, seed=0)
  graphdef, params = nnx.split(model)
  n = mesh.shape["sequence"]
  if n > 1:
    batch = {k: np.ascontiguousarray(LAYOUTS[layout][0](v, n, axis=2)) for k, v in batch.items()}
  data_sharding = batch_sharding(mesh, rules)
  batch = {k: jax.device_put(v, data_sharding) for k, v in batch.items()}
  fn = jax.jit(lambda p, b: loss_and_grads(graphdef, p, b, mesh if n > 1 else None),
               in_shardings=(shardings, data_sharding))
  loss, grads, _ = fn(params, batch)
  specs = {".".join(map(str, path)): var.get_value().sharding.spec for path, var in nnx.to_flat_state(params)}
  return float(loss), jax.tree.map(np.asarray, grads), specs, batch["inputs"].sharding.spec


@pytest.fixture(scope="module")
def single_device(batch):
  mesh = create_mesh(MeshConfig(), devices=jax.devices()[:1])
  return one_step(mesh, batch)


Q, EMB, DOWN, NORM = ("layers.0.self_attn.q_proj.kernel", "embed_tokens.embedding", "layers.1.mlp.down_proj.kernel",
                      "norm.weight")


@pytest.mark.parametrize("sizes, layout, expected", [
    (dict(data=8), None, {Q: P(), EMB: P(), DOWN: P(), NORM: P(), "batch": P(None, "data")}),
    (dict(data=1, fsdp=8), None, {Q: P("fsdp"), EMB: P(None, "fsdp"), DOWN: P(None, "fsdp"), NORM: P(),
                                  "batch": P(None, "fsdp")}),
    (dict(data=2, tensor=4), None, {Q: P(None, "tensor"), EMB: P("tensor"), DOWN: P("tensor"), NORM: P(),
                                    "batch": P(None, "data")}),
    (dict(data=1, fsdp=2, tensor=2, sequence=2), "striped",
     {Q: P("fsdp", "tensor"), EMB: P("tensor", "fsdp"), DOWN: P("tensor", "fsdp"), NORM: P(),
      "batch": P(None, "fsdp", "sequence")}),
], ids=["data8", "fsdp8", "data2-tensor4", "fsdp2-tensor2-sequence2"])
def test_sharded_step_matches_single_device(batch, single_device, sizes, layout, expected):
  ref_loss, ref_grads, _, _ = single_device
  mesh = create_mesh(MeshConfig(**sizes))
  loss, grads, specs, batch_spec = one_step(mesh, batch, layout or "contiguous")
  for name, spec in expected.items():
    assert (batch_spec if name == "batch" else specs[name]) == spec, name
  assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL)
  flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
  for (path, ref), got in zip(flat_ref, jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, ref, atol=GRAD_ATOL, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_parameters_are_created_in_their_shards():
  # (that the values equal an unsharded initialisation is what the single-device comparisons above rely on)
  mesh = create_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
  model, _ = create_sharded_model(CFG, mesh, DEFAULT_RULES, seed=0)
  kernel = model.layers[0].mlp.gate_proj.kernel.get_value()  # [embed 64, mlp 128] over (fsdp 2, tensor 4)
  assert kernel.sharding.spec == P("fsdp", "tensor")
  assert {s.data.shape for s in kernel.addressable_shards} == {(32, 32)}
  total = sum(math.prod(s.data.shape) for s in kernel.addressable_shards)
  assert total == kernel.size  # each element lives on exactly one device: nothing replicated or gathered
