"""Checks and times the dequantizing matmul (pallas_kernels.quantized_matmul) at decode shapes, against a bf16
matmul of the same size measured in the same run.

    python benchmarks/quantized_matmul.py --out results/quantized_matmul.json           # GPU/TPU: 4096 x 4096/11008
    python benchmarks/quantized_matmul.py --quick --out DIR/quantized_matmul.json       # device check: fewer sizes
    python benchmarks/quantized_matmul.py --small --out /tmp/qmm_cpu.json               # CPU (automatic on cpu)

Importable: `main(["--quick", "--out", path])` runs the same and returns the exit status.

For batch (rows of x) in --batches and each [K, N] weight shape, int8 (per channel) and int4 (group 128) codes
with random scales and zero points, every available implementation is
  1. checked against the float32 reference (bf16 tolerance of the test suite, 2e-2 of max |y|);
  2. timed (median of --iters runs after warm-up), with the weight bytes it must read (codes + scales + zeros)
     turned into achieved bandwidth GB/s; the bf16 matmul x @ W_bf16 is timed the same way.
Ratios "vs bf16" > 1 mean faster than the bf16 matmul. At decode (batch 1-16) the matmul is bound by reading
the weights, so int4 can approach 4x and int8 2x. Absolute numbers belong in docs/benchmarks.md only from a
GPU/TPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.attention import _time, write_result  # noqa: E402  (median ms after warm-up; the JSON record)
from pallas_kernels.quantized_matmul import api, pack_int4  # noqa: E402

TOL = 2e-2


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="path of the JSON results file")
  p.add_argument("--small", action="store_true", help="CPU-sized problems (automatic when the backend is cpu)")
  p.add_argument("--quick", action="store_true", help="fewer shapes and runs (the device check)")
  p.add_argument("--batches", default=None, help="comma-separated rows of x (default 1,4,16)")
  p.add_argument("--shapes", default=None, help="comma-separated KxN weight shapes (default 4096x4096,4096x11008)")
  p.add_argument("--impls", default=None, help="comma-separated implementations (default: all available but reference)")
  p.add_argument("--iters", type=int, default=None, help="timed runs per measurement (default 20; 3 small)")
  return p.parse_args(argv)


def _weights(rng, bits, group, k, n):
  codes = rng.integers(0, 2 ** bits, size=(k, n)).astype(np.uint8)
  w = pack_int4(codes) if bits == 4 else jnp.asarray(codes)
  scales = jnp.asarray(rng.uniform(0.002, 0.02, size=(k // group, n)), jnp.float16)
  zeros = jnp.asarray(rng.integers(1, 2 ** bits, size=(k // group, n)), jnp.float16)
  return w, scales, zeros


def main(argv=None) -> int:
  args = _parse(argv)
  backend = jax.default_backend()
  small = args.small or backend == "cpu"
  batches = [int(b) for b in args.batches.split(",")] if args.batches else ([1, 16] if args.quick else [1, 4, 16])
  default_shapes = ["512x512"] if small else (["4096x4096"] if args.quick else ["4096x4096", "4096x11008"])
  shapes = [tuple(int(v) for v in s.split("x")) for s in (args.shapes.split(",") if args.shapes else default_shapes)]
  iters = args.iters or (3 if small else (10 if args.quick else 20))
  impls = args.impls.split(",") if args.impls else [n for n in api.available_implementations() if n != "reference"]
  formats = [("int8", 8, None), ("int4_g128", 4, 128)]
  print(f"device: {jax.devices()[0].device_kind} ({backend}), jax {jax.__version__}, implementations: {impls}")
  settings = dict(batches=batches, shapes=shapes, iters=iters, implementations=impls, dtype="bfloat16",
                  formats=[f[0] for f in formats])
  rows, failed = [], False
  rng = np.random.default_rng(0)
  for k, n in shapes:
    for m in batches:
      x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
      w_bf16 = jnp.asarray(rng.standard_normal((k, n)) * 0.02, jnp.bfloat16)
      base_ms = _time(jax.jit(jnp.dot), x, w_bf16, iters=iters)
      base_bytes = w_bf16.nbytes + x.nbytes
      rows.append(dict(k=k, n=n, batch=m, format="bf16", implementation="jnp.dot", ms=base_ms,
                       gb_s=base_bytes / base_ms / 1e6, vs_bf16=1.0, max_err=0.0))
      for fmt, bits, group in formats:
        gs = group or k
        w, s, z = _weights(rng, bits, gs, k, n)
        ref = api.quantized_matmul(x, w, s, z, bits=bits, group_size=gs, implementation="reference")
        nbytes = w.nbytes + s.nbytes + z.nbytes + x.nbytes
        for impl in impls:
          row = dict(k=k, n=n, batch=m, format=fmt, implementation=impl)
          try:
            fn = jax.jit(lambda x, w, s, z, impl=impl, bits=bits, gs=gs: api.quantized_matmul(
                x, w, s, z, bits=bits, group_size=gs, implementation=impl))
            y = fn(x, w, s, z)
            err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref.astype(jnp.float32)))
                        / max(1.0, float(jnp.max(jnp.abs(ref.astype(jnp.float32))))))
            ms = _time(fn, x, w, s, z, iters=iters)
            row.update(ms=ms, gb_s=nbytes / ms / 1e6, vs_bf16=base_ms / ms, max_err=err, ok=err <= TOL)
            failed |= err > TOL
          except Exception as e:  # noqa: BLE001 - record and go on
            row.update(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc(limit=3))
            failed = True
          rows.append(row)
          print(json.dumps({k_: v for k_, v in row.items() if k_ != "trace"}), flush=True)
        write_result(args.out, "quantized_matmul", settings, rows, complete=False)
  write_result(args.out, "quantized_matmul", settings, rows, complete=True)
  print(f"\n{'K x N':>12} {'batch':>5} {'format':>10} {'impl':>10} {'ms':>8} {'GB/s':>8} {'vs bf16':>8}")
  for r in rows:
    if "ms" in r:
      print(f"{r['k']:>5} x {r['n']:<5} {r['batch']:>5} {r['format']:>10} {r['implementation']:>10} {r['ms']:>8.3f} "
            f"{r['gb_s']:>8.1f} {r['vs_bf16']:>7.2f}x")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
