"""Driver: Megatron tensor parallelism for inference (F3: Megatron-LM, DeepSpeed Inference), per tensor size.

Config: experiments/tensor_parallel.py (section `tp`, TensorParallelConfig below).

For each tensor-axis size t the same randomly initialised model is created sharded over a (tensor t) mesh of
forced host devices (init_model(cfg, mesh=...)), an Engine is built on it, and its compiled decode step (the
one-token-per-sequence program serving runs most) is inspected:
- collectives: every all-reduce / all-gather / reduce-scatter / all-to-all in the compiled HLO, counted, with
  the bytes of its result (the payload each device contributes); beside Megatron-LM's analysis (Shoeybi et
  al. 2019, sec. 3; Narayanan et al. 2021): two all-reduces of the [tokens, hidden] activations per layer in
  the forward pass (after the attention output projection and after the MLP down projection);
- per-device memory: parameter bytes and KV pool bytes on device 0, read from the arrays' shards;
- step time of the decode step on the CPU devices, as a ratio to t=1. NOT a speed measurement: the forced host
  devices share the same cores; wall-clock scaling is owed to a multi-chip machine.
"""

from __future__ import annotations

import dataclasses
import re

from jaxinfer.experiments import results
from jaxinfer.experiments.sections import check, read
from jaxinfer.experiments.timing import time_call

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}


@dataclasses.dataclass(frozen=True)
class TensorParallelConfig:
  SECTION = "tp"
  tensors: tuple[int, ...] = (1, 2, 4, 8)  # tensor-axis sizes (1: the baseline)
  host_devices: int = 8
  num_layers: int = 4
  hidden_size: int = 256
  intermediate_size: int = 1024
  num_heads: int = 8
  num_kv_heads: int = 8
  vocab_size: int = 1024
  batch: int = 8  # sequences per decode step
  page_size: int = 16
  pages_per_seq: int = 8
  repeats: int = 5  # timed decode steps per tensor size

  def __post_init__(self):
    cls = type(self)
    check(cls, "tensors", bool(self.tensors) and self.tensors[0] == 1 and max(self.tensors) <= self.host_devices,
          f"must start with 1 (the baseline) and stay within host_devices={self.host_devices}, got {self.tensors}")
    for t in self.tensors:
      check(cls, "tensors", self.num_heads % t == 0 and self.intermediate_size % t == 0,
            f"{t} must divide num_heads={self.num_heads} and intermediate_size={self.intermediate_size}")
    check(cls, "repeats", self.repeats >= 1, f"must be >= 1, got {self.repeats}")


SMOKE = dict(tensors=(1, 2), num_layers=1, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2,
             vocab_size=128, batch=4, pages_per_seq=2, repeats=1)


def collectives(hlo: str) -> dict[str, dict]:
  """{op: {"count", "bytes"}} over the compiled HLO text (async -start ops counted once, -done not)."""
  out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
  pattern = re.compile(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
  for line in hlo.splitlines():
    m = pattern.search(line)
    if m:
      shapes = re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))
      size = 0
      for dtype, dims in shapes:
        n = 1
        for d in filter(None, dims.split(",")):
          n *= int(d)
        size += n * BYTES.get(dtype, 4)
      out[m.group(2)]["count"] += 1
      out[m.group(2)]["bytes"] += size
  return out


def _device_bytes(arrays, device) -> int:
  return sum(s.data.nbytes for a in arrays for s in a.addressable_shards if s.device == device)


def measure(c: TensorParallelConfig, t: int) -> dict:
  import jax
  from flax import nnx

  import jaxinfer
  from jaxinfer.engine.batch import StepBatch
  from parallel.mesh import create_mesh

  cfg = jaxinfer.ModelConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                             intermediate_size=c.intermediate_size, num_layers=c.num_layers, num_heads=c.num_heads,
                             num_kv_heads=c.num_kv_heads, max_position_embeddings=c.page_size * c.pages_per_seq,
                             initializer_range=0.2)
  mesh = create_mesh({"tensor": t, "data": 1}, jax.devices()[:t]) if t > 1 else None
  model = jaxinfer.init_model(cfg, seed=0, mesh=mesh)
  engine = jaxinfer.Engine(model, max_batch_size=c.batch, page_size=c.page_size,
                           num_pages=c.batch * c.pages_per_seq, max_model_len=c.page_size * c.pages_per_seq,
                           async_scheduling=False)
  runner = engine.runner
  b = next(n for n in engine.seq_buckets if n >= c.batch)
  shape = (b, b, b, 0)  # a decode-only step: one token (and one sampled row) per sequence
  batch = StepBatch.empty(*shape, engine.pages_per_seq, runner.pool.num_slots)
  compiled = runner._steps[True].lower(runner.state_leaves, runner.pool, runner.table, runner.prev_sampled,
                                       batch).compile()
  ops = collectives(compiled.as_text())
  device = jax.devices()[0]
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  host = StepBatch.empty(*shape, engine.pages_per_seq, runner.pool.num_slots)

  def step():  # the compiled decode step on a batch of padding (the pool is donated: keep the new one)
    sampled, _, runner.pool, _ = compiled(runner.state_leaves, runner.pool, runner.table, runner.prev_sampled, host)
    return sampled

  timing = time_call(step, warmup=1, repeats=c.repeats)
  tokens, layers = shape[0], c.num_layers
  row = dict(tensor=t, tokens=tokens,
             param_bytes_total=sum(p.nbytes for p in params), param_bytes_device=_device_bytes(params, device),
             kv_bytes_total=sum(k.nbytes for k in runner.pool.k + runner.pool.v),
             kv_bytes_device=_device_bytes(runner.pool.k + runner.pool.v, device),
             megatron_allreduces=2 * layers if t > 1 else 0,
             megatron_allreduce_bytes=(2 * layers * tokens * c.hidden_size * 4) if t > 1 else 0,
             step_seconds_cpu=timing.median)
  for op, v in ops.items():
    row[f"{op}_count"], row[f"{op}_bytes"] = v["count"], v["bytes"]
  return row


def table(rows) -> str:
  kib = lambda x: f"{x / 1024:.1f}"  # noqa: E731
  header = ["tensor", "all-reduce (count / KiB)", "Megatron: 2 per layer (count / KiB)", "all-gather (count / KiB)",
            "reduce-scatter", "params / device (KiB, share)", "KV pool / device (KiB, share)",
            "CPU step time vs t=1 (NOT speed)"]
  out = []
  for r in rows:
    out.append([r["tensor"], f"{r['all-reduce_count']} / {kib(r['all-reduce_bytes'])}",
                f"{r['megatron_allreduces']} / {kib(r['megatron_allreduce_bytes'])}",
                f"{r['all-gather_count']} / {kib(r['all-gather_bytes'])}", r["reduce-scatter_count"],
                f"{kib(r['param_bytes_device'])} ({r['param_bytes_device'] / r['param_bytes_total']:.3f})",
                f"{kib(r['kv_bytes_device'])} ({r['kv_bytes_device'] / r['kv_bytes_total']:.3f})",
                f"{r['step_vs_t1']:.2f}x"])
  return results.markdown_table(header, out)


def plot(rows):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
  ts = [r["tensor"] for r in rows]
  ax[0].plot(ts, [r["param_bytes_device"] / r["param_bytes_total"] for r in rows], "o-", label="params")
  ax[0].plot(ts, [r["kv_bytes_device"] / r["kv_bytes_total"] for r in rows], "s--", label="KV pool")
  ax[0].plot(ts, [1 / t for t in ts], ":", color="gray", label="1/tensor")
  ax[0].set(xlabel="tensor axis size", ylabel="share held by one device", xscale="log", yscale="log")
  ax[0].legend()
  ax[1].plot(ts, [r["all-reduce_count"] for r in rows], "o-", label="all-reduces in the decode step (HLO)")
  ax[1].plot(ts, [r["megatron_allreduces"] for r in rows], "x:", label="Megatron: 2 per layer")
  ax[1].set(xlabel="tensor axis size", ylabel="collectives per step", xscale="log")
  ax[1].legend()
  return fig


def run(config) -> dict:
  from jaxinfer.experiments.ring_vs_striped import use_host_devices

  c = read(config, TensorParallelConfig, SMOKE)
  use_host_devices(c.host_devices)
  with results.open_run(config) as out:
    rows = [measure(c, t) for t in c.tensors]
    for r in rows:
      r["step_vs_t1"] = r["step_seconds_cpu"] / rows[0]["step_seconds_cpu"]
      out.log("tensor_parallel", **r)
    out.section(f"Tensor parallel decode step ({c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} heads / "
                f"{c.num_kv_heads} KV heads, vocab {c.vocab_size}, {c.batch} sequences; float32)",
                "Collectives counted in the compiled HLO of the Engine's decode step; bytes = the result size of "
                "each op (what one device contributes). Megatron-LM's analysis: two all-reduces of the [tokens, "
                "hidden] activations per layer in the forward pass; ops beyond those are XLA's (embedding lookup "
                "over the vocab-sharded table, the sampled rows' vocab-parallel reductions). Memory: bytes on "
                "device 0 from the arrays' shards. CPU step time: forced host devices share the same cores, so the "
                "ratio is NOT a speed measurement; the wall-clock scaling is owed to a multi-chip machine.",
                table(rows))
    out.figure(plot(rows), "tensor_parallel.png")
    print(out.markdown)
  return dict(rows=rows, dir=out.dir)
