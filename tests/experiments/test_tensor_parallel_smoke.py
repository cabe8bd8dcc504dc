"""`jaxinfer run --config experiments/tensor_parallel.py --config.smoke=True`: collectives and memory rows."""


def test_tensor_parallel_smoke(run_experiment):
  ran = run_experiment("tensor_parallel")
  rows = ran.rows("tensor_parallel")
  assert [r["tensor"] for r in rows] == [1, 2]
  one, two = rows
  assert one["all-reduce_count"] == 0 and one["all-gather_count"] == 0  # one device: no collectives
  # Megatron: >= 2 all-reduces per layer (1 layer), each at least the [tokens, hidden] activations
  assert two["all-reduce_count"] >= two["megatron_allreduces"] == 2
  assert two["all-reduce_bytes"] >= two["megatron_allreduce_bytes"] == 2 * 4 * 32 * 4
  # every parameter but the norms is split in two (vocab 128, heads 4, kv heads 2, mlp 64 all divide)
  assert 0.5 <= two["param_bytes_device"] / two["param_bytes_total"] < 0.52
  assert two["kv_bytes_device"] * 2 == two["kv_bytes_total"]
  assert one["param_bytes_device"] == one["param_bytes_total"]
  assert "NOT a speed measurement" in ran.markdown and "| 2 | " in ran.markdown
  assert (ran.dir / "tensor_parallel.png").stat().st_size > 10_000
