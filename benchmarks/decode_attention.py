"""Checks and times decode-time attention across the implementations available on this machine.

  python benchmarks/decode_attention.py [--out results/decode_attention.json] [--repeats 20] [--quick]

Importable: `main(["--quick", "--out", path])` runs the same and returns the result dict.

Ops: decode_attention (contiguous cache, split-K), paged_attention (pages of 16 scattered in the pool by a
random permutation) and ragged_paged_attention (a decode-only step, and a mixed step: one 512-token prefill
chunk plus decode tokens). Sizes: on a GPU/TPU batch 8-64, kv 1k-32k, 32 query / 8 kv heads, head_dim 128,
bfloat16; on CPU a few small ones (float32). Every implementation's output is first compared with "xla"
(and, at the small sizes, with "reference"); then each jitted call is timed (median of --repeats after a
warm-up). Reported per row: time, achieved bandwidth = bytes of K/V that must be read (sum of kv_lens x
kv_heads x head_dim x 2 x itemsize) / time, that bandwidth as a fraction of the device's copy bandwidth
(measured in the same run by timing a large jnp copy: bytes read + written / time), and the speed-up over
"xla" measured in the same run (xla time / implementation time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--quick", action="store_true", help="fewer sizes (a smoke run)")
  p.add_argument("--ops", default="decode,paged,ragged")
  p.add_argument("--out", default=None, help="write the results as JSON here")
  return p.parse_args(argv)


def timed(fn, args, repeats):
  import jax
  jax.block_until_ready(fn(*args))  # compile + warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def copy_bandwidth(nbytes: int, repeats: int) -> float:
  """Bytes/s of a jitted copy (x + 1 forces a real read and write) of an nbytes float32 array."""
  import jax
  import jax.numpy as jnp
  x = jnp.zeros((nbytes // 4,), jnp.float32)
  t = timed(jax.jit(lambda x: x + 1.0), (x,), repeats)
  return 2 * nbytes / t


def _fmt(x):
  return "-" if x is None else f"{x:.1e}"


def max_err(a, b):
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b))))


def sizes(backend: str, quick: bool):
  if backend == "cpu":
    dims = dict(q_heads=8, kv_heads=2, head_dim=64, dtype="float32")
    grid = [(4, 256), (4, 1024)] if not quick else [(2, 256)]
  else:
    dims = dict(q_heads=32, kv_heads=8, head_dim=128, dtype="bfloat16")
    grid = [(8, 1024), (8, 8192), (8, 32768), (32, 4096), (64, 1024), (64, 8192)]
    if quick:
      grid = [(8, 1024), (64, 8192)]
  return [dict(batch=b, kv_len=L, **dims) for b, L in grid]


def make_inputs(cfg, rng, page_size=16):
  import jax.numpy as jnp
  b, L, hq, hkv, d = cfg["batch"], cfg["kv_len"], cfg["q_heads"], cfg["kv_heads"], cfg["head_dim"]
  dtype = jnp.dtype(cfg["dtype"])
  q = jnp.asarray(rng.standard_normal((b, hq, d), np.float32)).astype(dtype)
  k = jnp.asarray(rng.standard_normal((b, L, hkv, d), np.float32)).astype(dtype)
  v = jnp.asarray(rng.standard_normal((b, L, hkv, d), np.float32)).astype(dtype)
  kv_lens = jnp.asarray(rng.integers(L * 3 // 4, L + 1, b), jnp.int32)
  pps = L // page_size
  perm = rng.permutation(b * pps).astype(np.int32)
  table = jnp.asarray(perm.reshape(b, pps))
  # Pool page perm[b * pps + i] holds sequence b's page i: the same K/V as the contiguous cache.
  inv = np.argsort(perm)
  k_pages = k.reshape(b * pps, page_size, hkv, d)[inv]
  v_pages = v.reshape(b * pps, page_size, hkv, d)[inv]
  return q, k, v, kv_lens, k_pages, v_pages, table


def _write(path, device, backend, bw, rows) -> dict:
  import jax
  result = dict(device=device.device_kind, backend=backend, jax=jax.__version__, host=platform.node(),
                copy_bandwidth_gb_per_s=bw / 1e9, rows=rows)
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
  return result


def main(argv=None) -> dict:
  args = parse_args(argv)
  import jax
  import jax.numpy as jnp

  import pallas_kernels
  from pallas_kernels.decode_attention import api as decode_api
  from pallas_kernels.paged_attention import api as paged_api

  backend = jax.default_backend()
  device = jax.devices()[0]
  repeats = args.repeats if backend != "cpu" else min(args.repeats, 5)
  bw = copy_bandwidth((1 << 30) if backend != "cpu" else (64 << 20), repeats)
  print(f"device: {device.device_kind} ({backend}), jax {jax.__version__}; copy bandwidth {bw / 1e9:.1f} GB/s")
  rng = np.random.default_rng(0)
  ops = args.ops.split(",")
  rows = []

  for cfg in sizes(backend, args.quick):
    q, k, v, kv_lens, k_pages, v_pages, table = make_inputs(cfg, rng)
    kv_bytes = int(np.sum(np.asarray(kv_lens))) * cfg["kv_heads"] * cfg["head_dim"] * 2 * k.dtype.itemsize
    small = cfg["batch"] * cfg["kv_len"] <= 8192
    b = cfg["batch"]
    calls = {}
    if "decode" in ops:
      calls["decode_attention"] = (
          decode_api.available_implementations(),
          lambda impl: jax.jit(lambda q, k, v, kl: pallas_kernels.decode_attention(q, k, v, kl, implementation=impl)),
          (q, k, v, kv_lens), kv_bytes)
    if "paged" in ops:
      calls["paged_attention"] = (
          paged_api.available_implementations(),
          lambda impl: jax.jit(lambda *a: pallas_kernels.paged_attention(*a, implementation=impl)),
          (q, k_pages, v_pages, table, kv_lens), kv_bytes)
    if "ragged" in ops:
      ragged_fn = lambda impl: jax.jit(lambda *a: pallas_kernels.ragged_paged_attention(*a, implementation=impl))
      cu = jnp.arange(b + 1, dtype=jnp.int32)
      calls["ragged_decode_step"] = (paged_api.available_implementations(), ragged_fn,
                                     (q, k_pages, v_pages, table, kv_lens, cu, jnp.int32(b)), kv_bytes)
      chunk = min(512, cfg["kv_len"] // 2)  # sequence 0 prefills its last `chunk` tokens, the others decode
      qm = jnp.concatenate([jnp.asarray(rng.standard_normal((chunk - 1, *q.shape[1:]), np.float32)).astype(q.dtype),
                            q])
      cu_m = jnp.concatenate([jnp.zeros((1,), jnp.int32), chunk + jnp.arange(b, dtype=jnp.int32)])
      calls["ragged_mixed_step"] = (paged_api.available_implementations(), ragged_fn,
                                    (qm, k_pages, v_pages, table, kv_lens, cu_m, jnp.int32(b)), kv_bytes)

    for op, (impls, make, op_args, nbytes) in calls.items():
      if not small:
        impls = [i for i in impls if i != "reference"]  # it materialises float32 copies of the whole cache
      outs, times = {}, {}
      for impl in impls:
        fn = make(impl)
        try:
          outs[impl] = np.asarray(jax.block_until_ready(fn(*op_args)), np.float32)
          times[impl] = timed(fn, op_args, repeats)
        except Exception as e:  # report and go on: one failing implementation must not hide the others
          print(f"  {op} {impl}: FAILED {type(e).__name__}: {str(e)[:200]}")
          rows.append(dict(op=op, impl=impl, **cfg, error=f"{type(e).__name__}: {e}"[:500]))
      base = outs.get("reference", outs.get("xla"))
      for impl, t in times.items():
        row = dict(op=op, impl=impl, **cfg, time_ms=t * 1e3, kv_gb_per_s=nbytes / t / 1e9,
                   fraction_of_copy_bw=nbytes / t / bw,
                   speedup_vs_xla=(times["xla"] / t) if "xla" in times else None,
                   max_rel_err_vs_baseline=max_err(outs[impl], base) if base is not None else None)
        rows.append(row)
        sp = f"{row['speedup_vs_xla']:.2f}x" if row["speedup_vs_xla"] else "-"
        print(f"{op:20s} {impl:11s} b={cfg['batch']:3d} kv={cfg['kv_len']:6d} {row['time_ms']:9.3f} ms "
              f"{row['kv_gb_per_s']:8.1f} GB/s {100 * row['fraction_of_copy_bw']:5.1f}% of copy  vs xla {sp:>7s}  "
              f"err {_fmt(row['max_rel_err_vs_baseline'])}")
    _write(args.out, device, backend, bw, rows)  # what is measured so far survives a time limit

  result = _write(args.out, device, backend, bw, rows)
  if args.out:
    print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
