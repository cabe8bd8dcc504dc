"""Ring attention vs Striped Attention (Brandon et al. 2023) vs zigzag: causal load balance and memory.

Part 1 (load balance, no kernel timing): for N devices and a total length L, every device holds L/N tokens of a
layout (contiguous / striped / zigzag). At ring step t device d attends its queries to the key block of device
(d - t) mod N. The work of that step is the number of (block_q x block_k) tiles the kernel computes, counted
with the kernel's own skip test (`pallas_kernels.flash_attention.tiles.tile_visibility` on the positions the
device holds at that step; ring attention skips a whole block when it has no visible tile). Ring steps are
synchronous, so the critical path is the sum over steps of the busiest device's work; the speedup of a
layout is contiguous critical path / its critical path. Shown beside the bound 2N/(N+1) and the paper's
measured 1.45x (256k tokens, A100/TPUv4) and 1.65x (786k tokens, 16 TPUv4).

Part 2 (memory): per-device memory of ring attention forward+backward at a fixed total length on meshes of
N = 1, 2, 4, 8 devices, from XLA's compiled memory analysis (`jit(...).lower(...).compile().memory_analysis()`),
run on forced host devices.

    python experiments/ring_vs_striped.py --out results/ring_vs_striped [--config.memory.total_len=8192]
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import ml_collections

PAPER_CLAIMS = (("1.45x @ 256k (A100 / TPUv4)", 1.45), ("1.65x @ 786k (16 TPUv4)", 1.65))


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "ring_vs_striped"
  c.devices = (2, 4, 8)
  c.seq_lens = (4096, 8192, 16384, 32768, 65536)
  c.layouts = ("contiguous", "striped", "zigzag")
  c.block_q = 128
  c.block_k = 128
  c.causal = True
  c.sliding_window = ml_collections.config_dict.placeholder(int)
  c.host_devices = 8  # forced host devices (XLA_FLAGS), set before jax is imported
  c.memory = ml_collections.ConfigDict()
  c.memory.enabled = True
  c.memory.devices = (1, 2, 4, 8)
  c.memory.total_len = 16384
  c.memory.batch = 1
  c.memory.heads = 8
  c.memory.kv_heads = 8
  c.memory.head_dim = 64
  c.memory.dtype = "bfloat16"
  c.memory.implementation = "xla"
  c.memory.layout = "striped"
  return c


def validate(c):
  for n in c.devices:
    for length in c.seq_lens:
      if length % (2 * n):
        raise ValueError(f"config.seq_lens: {length} is not divisible by 2 * {n} (zigzag needs 2N chunks)")
  if max(max(c.devices), max(c.memory.devices)) > c.host_devices:
    raise ValueError(f"config.devices / config.memory.devices exceed config.host_devices={c.host_devices}")
  if c.memory.total_len % (2 * max(c.memory.devices)):
    raise ValueError(f"config.memory.total_len={c.memory.total_len} not divisible by 2 * max(memory.devices)")


# ------------------------------------------------------------------------------------------------ part 1


def tile_counts(n, length, layout, c):
  """Work [steps, devices]: tiles computed by device d at ring step t (0 where the block is skipped)."""
  import jax
  import numpy as np

  from pallas_kernels.flash_attention.tiles import tile_visibility
  from parallel.layouts import layout_positions

  blocks = layout_positions(layout, length, n).reshape(n, length // n)  # positions held by device d
  d = np.arange(n)
  steps = np.arange(n)
  q_pos = np.broadcast_to(blocks[None], (n, n, length // n))  # [t, d, len]
  kv_pos = blocks[(d[None, :] - steps[:, None]) % n]  # block of device (d - t) mod N
  vis = jax.jit(tile_visibility, static_argnames=("causal", "sliding_window", "block_q", "block_k"))(
      jax.numpy.asarray(q_pos.reshape(n * n, -1)), jax.numpy.asarray(kv_pos.reshape(n * n, -1)), None, None,
      causal=c.causal, sliding_window=c.sliding_window, block_q=c.block_q, block_k=c.block_k)
  return np.asarray(vis).reshape(n, n, -1).sum(-1)


def load_balance(c):
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
      for layout in c.layouts:
        row[f"{layout}_speedup"] = row["contiguous_critical"] / row[f"{layout}_critical"]
        row[f"{layout}_balance"] = row[f"{layout}_total"] / n / row[f"{layout}_critical"]  # 1 = perfect
      rows.append(row)
  return rows


def load_balance_table(rows, layouts):
  others = [x for x in layouts if x != "contiguous"]
  head = (["N", "seq", "tiles"] + [f"{x} crit. path" for x in layouts] + [f"{x} speedup" for x in others]
          + [f"{x} balance" for x in layouts] + ["2N/(N+1)", "(2N-1)/N"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = ([str(r["devices"]), f"{r['seq_len'] // 1024}k", r["block"]]
             + [str(r[f"{x}_critical"]) for x in layouts] + [f"{r[f'{x}_speedup']:.3f}x" for x in others]
             + [f"{r[f'{x}_balance']:.3f}" for x in layouts] + [f"{r['bound']:.3f}x", f"{r['limit']:.3f}x"])
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ part 2


def memory_rows(c):
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from parallel import ring_attention
  from parallel.layouts import layout_positions

  m = c.memory
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

    def loss(q, k, v, pos):
      o = ring_attention(q, k, v, mesh=mesh, causal=c.causal, q_positions=pos, kv_positions=pos,
                         sliding_window=c.sliding_window, implementation=m.implementation)
      return jnp.sum(o.astype(jnp.float32))

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, pos).compile()
    stats = compiled.memory_analysis()
    row = dict(devices=n, seq_len=length, tokens_per_device=length // n,
               argument_bytes=int(stats.argument_size_in_bytes), output_bytes=int(stats.output_size_in_bytes),
               temp_bytes=int(stats.temp_size_in_bytes), alias_bytes=int(stats.alias_size_in_bytes))
    row["total_bytes"] = row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"] - row["alias_bytes"]
    rows.append(row)
  base = rows[0]["total_bytes"] if rows else 1
  for r in rows:
    r["total_vs_first"] = r["total_bytes"] / base
  return rows


def memory_table(rows):
  mib = lambda x: f"{x / 2**20:.2f}"
  head = ["N", "tokens/device", "arguments MiB", "outputs MiB", "temp MiB", "total MiB", "total vs N=1"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    lines.append("| " + " | ".join([str(r["devices"]), str(r["tokens_per_device"]), mib(r["argument_bytes"]),
                                    mib(r["output_bytes"]), mib(r["temp_bytes"]), mib(r["total_bytes"]),
                                    f"{r['total_vs_first']:.3f}"]) + " |")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ output


def plot(rows, mem, c, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ncols = 3 if mem else 2
  fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.5))
  colors = dict(zip(c.devices, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]))
  styles = {"striped": "-o", "zigzag": "--s"}
  ax = axes[0]
  for n in c.devices:
    rs = [r for r in rows if r["devices"] == n]
    xs = [r["seq_len"] // 1024 for r in rs]
    for layout in c.layouts:
      if layout == "contiguous":
        continue
      ax.plot(xs, [r[f"{layout}_speedup"] for r in rs], styles.get(layout, "-"), color=colors[n],
              label=f"{layout}, N={n}")
    ax.axhline(2 * n / (n + 1), color=colors[n], linestyle=":", linewidth=1, label=f"2N/(N+1), N={n}")
  for label, value in PAPER_CLAIMS:
    ax.axhline(value, color="gray", linestyle="-.", linewidth=1)
    ax.annotate(f"paper {label}", (min(c.seq_lens) // 1024, value), fontsize=7, color="gray",
                xytext=(0, 2), textcoords="offset points")
  ax.set_xscale("log", base=2)
  ax.set_xticks([x // 1024 for x in c.seq_lens], [str(x // 1024) for x in c.seq_lens])
  ax.set_xlabel("total sequence length (k tokens)")
  ax.set_ylabel("critical-path speedup vs contiguous ring")
  ax.set_title(f"causal ring attention, tiles {c.block_q}x{c.block_k}")
  ax.legend(fontsize=6, ncol=2)

  ax = axes[1]
  n, length = max(c.devices), max(c.seq_lens)
  r = next(r for r in rows if r["devices"] == n and r["seq_len"] == length)
  width = 0.8 / len(c.layouts)
  for i, layout in enumerate(c.layouts):
    ax.bar([t + i * width for t in range(n)], r[f"{layout}_per_step_max"], width, label=layout)
  ax.set_xlabel("ring step")
  ax.set_ylabel("tiles on the busiest device")
  ax.set_title(f"per-step critical work, N={n}, {length // 1024}k tokens")
  ax.legend(fontsize=8)

  if mem:
    ax = axes[2]
    ns = [m["devices"] for m in mem]
    ax.plot(ns, [m["total_bytes"] / 2**20 for m in mem], "-o", label="measured (args+outputs+temp)")
    ax.plot(ns, [mem[0]["total_bytes"] / 2**20 / k * ns[0] for k in ns], ":", label="seq/N")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(k) for k in ns])
    ax.set_yscale("log", base=2)
    ax.set_xlabel("devices N (fixed total length)")
    ax.set_ylabel("per-device MiB")
    ax.set_title(f"ring fwd+bwd memory, {c.memory.total_len // 1024}k tokens")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(c, out_dir):
  validate(c)
  import jax

  os.makedirs(out_dir, exist_ok=True)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
  env = f"jax {jax.__version__}, backend {jax.default_backend()}, {len(jax.devices())} devices, {stamp}"
  rows = load_balance(c)
  mem = memory_rows(c) if c.memory.enabled else []
  t1 = load_balance_table(rows, list(c.layouts))
  md = [f"# {c.name}", "", f"Measured {env}.", "",
        "## Causal load balance (tile counts with the kernel's tile_visibility, not timings)", "",
        "critical path = sum over ring steps of the busiest device's tiles; speedup = contiguous / layout; "
        "balance = (total tiles / N) / critical path (1.0 = perfectly balanced). (2N-1)/N is the large-length "
        "limit of this tile ratio (contiguous: one half-masked diagonal step + N-1 full steps; balanced layouts: N "
        "half steps). Paper (measured end to end): " + "; ".join(label for label, _ in PAPER_CLAIMS) + ".", "",
        t1, ""]
  if mem:
    md += [f"## Per-device memory of ring attention forward+backward ({c.memory.total_len} tokens, "
           f"{c.memory.layout} layout, implementation={c.memory.implementation!r}, {c.memory.dtype}, "
           f"batch {c.memory.batch}, {c.memory.heads} heads x {c.memory.head_dim})", "",
           "XLA compiled memory_analysis() per device on forced host devices; total = arguments + outputs + "
           "temp - aliased.", "", memory_table(mem), ""]
  text = "\n".join(md)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(text)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    f.write(c.to_json(indent=2))
  with open(os.path.join(out_dir, "metrics.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps(dict(kind="load_balance", **r)) + "\n")
    for r in mem:
      f.write(json.dumps(dict(kind="memory", **r)) + "\n")
  plot(rows, mem, c, os.path.join(out_dir, "ring_vs_striped.png"))
  print(text)
  print(f"wrote {out_dir}/results.md, metrics.jsonl, config.json, ring_vs_striped.png")
  return rows, mem


def main(argv=None):
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_dict("config", get_config(), "experiment knobs (override as --config.x=y)")
  flags.DEFINE_string("out", "results/ring_vs_striped", "output folder")

  def _main(_):
    c = flags.FLAGS.config
    # Forced host devices must be set before jax is imported (the memory part needs N of them).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={c.host_devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    run(c, flags.FLAGS.out)

  app.run(_main, argv=argv)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repository root
  main()
