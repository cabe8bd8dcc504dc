"""Driver: ring attention vs Striped Attention (Brandon et al. 2023) vs zigzag, causal load balance and memory.

Config: experiments/ring_vs_striped.py (sections `balance` and `memory`, the dataclasses below).

Part 1 (load balance, no kernel timing): for N devices and a total length L, every device holds L/N tokens of a
layout (contiguous / striped / zigzag). At ring step t device d attends its queries to the key block of device
(d - t) mod N. The work of that step is the number of (block_q x block_k) tiles the kernel computes, counted
with the kernel's own skip test (`pallas_kernels.flash_attention.tiles.tile_visibility` on the positions the
device holds at that step; ring attention skips a whole block when it has no visible tile). Ring steps are
synchronous, so the critical path is the sum over steps of the busiest device's work; the speedup of a
layout is contiguous critical path / its critical path.

Part 2 (memory): per-device memory of ring attention forward+backward at a fixed total length on meshes of
N = 1, 2, 4, 8 devices, from XLA's compiled memory analysis, on forced host devices.
"""

from __future__ import annotations

import dataclasses
import os

from jaxinfer.experiments import results
from jaxinfer.experiments.sections import check, read
from jaxinfer.experiments.timing import ratios

LAYOUTS = ("contiguous", "striped", "zigzag")
PAPER_CLAIMS = (("1.45x @ 256k (A100 / TPUv4)", 1.45), ("1.65x @ 786k (16 TPUv4)", 1.65))


@dataclasses.dataclass(frozen=True)
class LoadBalanceConfig:
  SECTION = "balance"
  devices: tuple[int, ...] = (2, 4, 8)
  seq_lens: tuple[int, ...] = (4096, 8192, 16384, 32768, 65536)
  layouts: tuple[str, ...] = LAYOUTS  # must include contiguous (the baseline)
  block_q: int = 128
  block_k: int = 128
  causal: bool = True
  sliding_window: int | None = None

  def __post_init__(self):
    cls = type(self)
    check(cls, "layouts", "contiguous" in self.layouts and set(self.layouts) <= set(LAYOUTS),
          f"choose from {LAYOUTS}, contiguous included (the baseline); got {self.layouts}")
    check(cls, "devices", bool(self.devices) and all(n >= 1 for n in self.devices), f"got {self.devices}")
    check(cls, "block_q", self.block_q >= 1, f"must be >= 1, got {self.block_q}")
    check(cls, "block_k", self.block_k >= 1, f"must be >= 1, got {self.block_k}")
    for n in self.devices:
      for length in self.seq_lens:
        check(cls, "seq_lens", length % (2 * n) == 0,
              f"{length} is not divisible by 2 * {n} (zigzag needs 2N chunks)")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
  SECTION = "memory"
  enabled: bool = True
  devices: tuple[int, ...] = (1, 2, 4, 8)
  host_devices: int = 8  # forced CPU devices, set before JAX starts its backend (when it has not yet)
  total_len: int = 16384
  batch: int = 1
  heads: int = 8
  kv_heads: int = 8
  head_dim: int = 64
  dtype: str = "bfloat16"
  implementation: str = "xla"
  layout: str = "striped"

  def __post_init__(self):
    cls = type(self)
    check(cls, "layout", self.layout in LAYOUTS, f"choose from {LAYOUTS}, got {self.layout!r}")
    check(cls, "devices", bool(self.devices) and max(self.devices) <= self.host_devices,
          f"{self.devices} needs more than memory.host_devices={self.host_devices}")
    check(cls, "total_len", self.total_len % (2 * max(self.devices)) == 0,
          f"{self.total_len} is not divisible by 2 * max(memory.devices) = {2 * max(self.devices)}")
    check(cls, "heads", self.heads % self.kv_heads == 0, f"{self.heads} is not a multiple of kv_heads")
    check(cls, "dtype", self.dtype in ("float32", "bfloat16", "float16"), f"got {self.dtype!r}")


SMOKE = dict(balance=dict(devices=(2, 4), seq_lens=(1024, 2048)),
             memory=dict(devices=(1, 2), total_len=512, heads=2, kv_heads=2, head_dim=16))


# ------------------------------------------------------------------------------------------------ part 1


def tile_counts(n: int, length: int, layout: str, c: LoadBalanceConfig):
  """Work [steps, devices]: tiles computed by device d at ring step t (0 where the block is skipped)."""
  import jax
  import numpy as np

  from pallas_kernels.flash_attention.tiles import tile_visibility
  from parallel.layouts import layout_positions

  blocks = layout_positions(layout, length, n).reshape(n, length // n)  # positions held by device d
  d, steps = np.arange(n), np.arange(n)
  q_pos = np.broadcast_to(blocks[None], (n, n, length // n))  # [t, d, len]
  kv_pos = blocks[(d[None, :] - steps[:, None]) % n]  # block of device (d - t) mod N
  vis = jax.jit(tile_visibility, static_argnames=("causal", "sliding_window", "block_q", "block_k"))(
      jax.numpy.asarray(q_pos.reshape(n * n, -1)), jax.numpy.asarray(kv_pos.reshape(n * n, -1)), None, None,
      causal=c.causal, sliding_window=c.sliding_window, block_q=c.block_q, block_k=c.block_k)
  return np.asarray(vis).reshape(n, n, -1).sum(-1)


def load_balance(c: LoadBalanceConfig) -> list[dict]:
  rows = []
  for n in c.devices:
    for length in c.seq_lens:
      row = dict(devices=n, seq_len=length, block=f"{c.block_q}x{c.block_k}", bound=2 * n / (n + 1),
                 limit=(2 * n - 1) / n)
      for layout in c.layouts:
        work = tile_counts(n, length, layout, c)
        row[f"{layout}_critical"] = int(work.max(axis=1).sum())
        row[f"{layout}_total"] = int(work.sum())
        row[f"{layout}_per_step_max"] = work.max(axis=1).tolist()
        row[f"{layout}_skipped_blocks"] = int((work == 0).sum())
      # speedup = contiguous critical path / layout's: the inverse ratio of critical paths
      for layout, r in ratios({x: 1 / row[f"{x}_critical"] for x in c.layouts}, "contiguous").items():
        row[f"{layout}_speedup"] = r
        row[f"{layout}_balance"] = row[f"{layout}_total"] / n / row[f"{layout}_critical"]  # 1 = perfect
      rows.append(row)
  return rows


def load_balance_table(rows: list[dict], layouts) -> str:
  others = [x for x in layouts if x != "contiguous"]
  head = (["N", "seq", "tiles"] + [f"{x} crit. path" for x in layouts] + [f"{x} speedup" for x in others]
          + [f"{x} balance" for x in layouts] + ["2N/(N+1)", "(2N-1)/N"])
  cells = [[str(r["devices"]), f"{r['seq_len'] // 1024}k", r["block"]] + [str(r[f"{x}_critical"]) for x in layouts]
           + [f"{r[f'{x}_speedup']:.3f}x" for x in others] + [f"{r[f'{x}_balance']:.3f}" for x in layouts]
           + [f"{r['bound']:.3f}x", f"{r['limit']:.3f}x"] for r in rows]
  return results.markdown_table(head, cells)


# ------------------------------------------------------------------------------------------------ part 2


def use_host_devices(count: int) -> None:
  """Ask for `count` CPU devices if JAX's backend has not started and XLA_FLAGS does not force a count."""
  import jax

  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # the backend is up already: measure on the devices there are
    pass


def memory_rows(m: MemoryConfig, c: LoadBalanceConfig) -> list[dict]:
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from parallel import ring_attention
  from parallel.layouts import layout_positions

  dtype = jnp.dtype(m.dtype)
  rows = []
  for n in m.devices:
    if n > len(jax.devices()):
      print(f"memory: skipping N={n}: only {len(jax.devices())} devices")
      continue
    mesh = jax.make_mesh((n,), ("sequence",), devices=jax.devices()[:n])
    sh = NamedSharding(mesh, P(None, "sequence"))
    b, length = m.batch, m.total_len
    q = jax.ShapeDtypeStruct((b, length, m.heads, m.head_dim), dtype, sharding=sh)
    kv = jax.ShapeDtypeStruct((b, length, m.kv_heads, m.head_dim), dtype, sharding=sh)
    pos = jax.device_put(jnp.asarray(layout_positions(m.layout, length, n, batch=b)), sh)

    def loss(q, k, v, pos, mesh=mesh):
      o = ring_attention(q, k, v, mesh=mesh, causal=c.causal, q_positions=pos, kv_positions=pos,
                         sliding_window=c.sliding_window, implementation=m.implementation)
      return jnp.sum(o.astype(jnp.float32))

    stats = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, pos).compile().memory_analysis()
    row = dict(devices=n, seq_len=length, tokens_per_device=length // n,
               argument_bytes=int(stats.argument_size_in_bytes), output_bytes=int(stats.output_size_in_bytes),
               temp_bytes=int(stats.temp_size_in_bytes), alias_bytes=int(stats.alias_size_in_bytes))
    row["total_bytes"] = row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"] - row["alias_bytes"]
    rows.append(row)
  for r in rows:
    r["total_vs_first"] = r["total_bytes"] / rows[0]["total_bytes"]
  return rows


def memory_table(rows: list[dict]) -> str:
  mib = lambda x: f"{x / 2**20:.2f}"  # noqa: E731
  head = ["N", "tokens/device", "arguments MiB", "outputs MiB", "temp MiB", "total MiB", "total vs N=1"]
  return results.markdown_table(head, [[str(r["devices"]), str(r["tokens_per_device"]), mib(r["argument_bytes"]),
                                        mib(r["output_bytes"]), mib(r["temp_bytes"]), mib(r["total_bytes"]),
                                        f"{r['total_vs_first']:.3f}"] for r in rows])


# ------------------------------------------------------------------------------------------------ plot


def plot(rows: list[dict], mem: list[dict], c: LoadBalanceConfig, m: MemoryConfig):
  plt = results.pyplot()
  ncols = 3 if mem else 2
  fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.5))
  colors = dict(zip(c.devices, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]))
  styles = {"striped": "-o", "zigzag": "--s"}
  ax = axes[0]
  for n in c.devices:
    rs = [r for r in rows if r["devices"] == n]
    xs = [r["seq_len"] // 1024 for r in rs]
    for layout in c.layouts:
      if layout != "contiguous":
        ax.plot(xs, [r[f"{layout}_speedup"] for r in rs], styles.get(layout, "-"), color=colors[n],
                label=f"{layout}, N={n}")
    ax.axhline(2 * n / (n + 1), color=colors[n], linestyle=":", linewidth=1, label=f"2N/(N+1), N={n}")
  for label, value in PAPER_CLAIMS:
    ax.axhline(value, color="gray", linestyle="-.", linewidth=1)
    ax.annotate(f"paper {label}", (min(c.seq_lens) // 1024, value), fontsize=7, color="gray",
                xytext=(0, 2), textcoords="offset points")
  ax.set_xscale("log", base=2)
  ax.set_xticks([x // 1024 for x in c.seq_lens], [str(x // 1024) for x in c.seq_lens])
  ax.set(xlabel="total sequence length (k tokens)", ylabel="critical-path speedup vs contiguous ring",
         title=f"causal ring attention, tiles {c.block_q}x{c.block_k}")
  ax.legend(fontsize=6, ncol=2)

  ax = axes[1]
  n, length = max(c.devices), max(c.seq_lens)
  r = next(r for r in rows if r["devices"] == n and r["seq_len"] == length)
  width = 0.8 / len(c.layouts)
  for i, layout in enumerate(c.layouts):
    ax.bar([t + i * width for t in range(n)], r[f"{layout}_per_step_max"], width, label=layout)
  ax.set(xlabel="ring step", ylabel="tiles on the busiest device",
         title=f"per-step critical work, N={n}, {length // 1024}k tokens")
  ax.legend(fontsize=8)

  if mem:
    ax = axes[2]
    ns = [x["devices"] for x in mem]
    ax.plot(ns, [x["total_bytes"] / 2**20 for x in mem], "-o", label="measured (args+outputs+temp)")
    ax.plot(ns, [mem[0]["total_bytes"] / 2**20 / k * ns[0] for k in ns], ":", label="seq/N")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(k) for k in ns])
    ax.set_yscale("log", base=2)
    ax.set(xlabel="devices N (fixed total length)", ylabel="per-device MiB",
           title=f"ring fwd+bwd memory, {m.total_len // 1024}k tokens")
    ax.legend(fontsize=8)
  return fig


# ------------------------------------------------------------------------------------------------ run


def run(config) -> dict:
  c = read(config, LoadBalanceConfig, SMOKE["balance"])
  m = read(config, MemoryConfig, SMOKE["memory"])
  if m.enabled:
    use_host_devices(m.host_devices)
  with results.open_run(config) as out:
    rows = load_balance(c)
    for row in rows:
      out.log("load_balance", **row)
    mem = memory_rows(m, c) if m.enabled else []
    for row in mem:
      out.log("memory", **row)
    out.section("Causal load balance (tile counts with the kernel's tile_visibility, not timings)",
                "critical path = sum over ring steps of the busiest device's tiles; speedup = contiguous / layout; "
                "balance = (total tiles / N) / critical path (1.0 = perfectly balanced). (2N-1)/N is the "
                "large-length limit of this tile ratio (contiguous: one half-masked diagonal step + N-1 full steps; "
                "balanced layouts: N half steps). Paper (measured end to end): "
                + "; ".join(label for label, _ in PAPER_CLAIMS) + ".", load_balance_table(rows, c.layouts))
    if mem:
      out.section(f"Per-device memory of ring attention forward+backward ({m.total_len} tokens, {m.layout} layout, "
                  f"implementation={m.implementation!r}, {m.dtype}, batch {m.batch}, {m.heads} heads x {m.head_dim})",
                  "XLA compiled memory_analysis() per device on forced host devices; total = arguments + outputs + "
                  "temp - aliased.", memory_table(mem))
    out.figure(plot(rows, mem, c, m), "ring_vs_striped.png")
    print(out.markdown)
  return dict(load_balance=rows, memory=mem, dir=out.dir)
