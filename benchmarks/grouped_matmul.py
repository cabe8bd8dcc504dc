"""Checks and times the grouped matmul (pallas_kernels.grouped_matmul) at MoE expert shapes, every
implementation side by side with XLA's jax.lax.ragged_dot measured in the same run.

    python benchmarks/grouped_matmul.py --out results/grouped_matmul.json        # GPU/TPU: MoE sizes
    python benchmarks/grouped_matmul.py --quick --out DIR/grouped_matmul.json    # device check: fewer sizes
    python benchmarks/grouped_matmul.py --small --out /tmp/gmm_cpu.json          # CPU (automatic on cpu)
    python benchmarks/grouped_matmul.py --small --interpret --out /tmp/gmm.json  # CPU, Pallas in interpret mode
    python benchmarks/grouped_matmul.py --quick --tiles 128x64x128,64x32x64 --out DIR/gmm_tiles.json  # tuning

Importable: `main(["--quick", "--out", path])` runs the same and returns the exit status.

For each problem (experts G, rows M = tokens x top-k sorted by expert, K -> N) and each group-size
distribution ("balanced": M / G each; "skewed": Dirichlet(0.3) router loads, one expert empty, 5% of the rows
past the groups as in a padded token buffer), every available implementation is
  1. checked against the float32 reference, forward and both gradients (bf16 tolerance of the test suite,
     2e-2 of max |expected|);
  2. timed forward and forward+backward (median of --iters runs after warm-up), with TFLOP/s of the rows in
     groups (2 M K N forward, 3x that with the backward).
"vs xla" > 1 means faster than ragged_dot. Absolute numbers belong in docs only from a GPU/TPU; on CPU the
Pallas kernels only run in interpret mode (a correctness check, not a timing).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.attention import _time, write_result  # noqa: E402  (median ms after warm-up; the JSON record)
from pallas_kernels.grouped_matmul import api  # noqa: E402

TOL = 2e-2
# (name, G, M, K, N): Mixtral-8x7B w1 (top-2), Qwen1.5-MoE-A2.7B experts (60, top-4), DeepSeek-style 64 small
PROBLEMS = [("mixtral_w1", 8, 4096, 4096, 14336), ("qwen_moe_up", 60, 8192, 2048, 1408),
            ("fine_64x", 64, 8192, 2048, 704)]
QUICK = [("mixtral_w1", 8, 2048, 4096, 14336), ("qwen_moe_up", 60, 4096, 2048, 1408)]
SMALL = [("small_8x", 8, 256, 128, 192), ("small_6x_odd", 6, 150, 96, 100)]


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="path of the JSON results file")
  p.add_argument("--small", action="store_true", help="CPU-sized problems (automatic when the backend is cpu)")
  p.add_argument("--quick", action="store_true", help="fewer problems and runs (the device check)")
  p.add_argument("--interpret", action="store_true", help="also run the Pallas kernels in interpret mode (CPU)")
  p.add_argument("--impls", default=None, help="comma-separated implementations (default: all available but "
                 "reference)")
  p.add_argument("--iters", type=int, default=None, help="timed runs per measurement (default 20; 3 small)")
  p.add_argument("--tiles", default=None, help="extra tile settings TMxTKxTN,... timed for each Pallas "
                 "implementation beside its defaults (tile tuning), as e.g. pallas_gpu[128x64x128]")
  return p.parse_args(argv)


def group_sizes(rng, kind: str, g: int, m: int) -> np.ndarray:
  if kind == "balanced":
    sizes = np.full(g, m // g)
    sizes[: m - sizes.sum()] += 1
    return sizes.astype(np.int32)
  probs = rng.dirichlet(np.full(g, 0.3))
  probs[rng.integers(g)] = 0.0
  return rng.multinomial(int(m * 0.95), probs / probs.sum()).astype(np.int32)


def _fns(impl: str, interpret: bool):
  """(forward, forward+backward) jitted; the backward returns (d lhs, d rhs) of sum(out * ct). impl may carry
  tiles, "pallas_gpu[128x64x128]": the module's function with tm, tk, tn."""
  if "[" in impl:
    name, tiles = impl.rstrip("]").split("[")
    tm, tk, tn = (int(t) for t in tiles.split("x"))
    fn = functools.partial(api.OP.module(name).grouped_matmul, interpret=interpret, tm=tm, tk=tk, tn=tn)
  else:
    fn = functools.partial(api.grouped_matmul, implementation=impl, interpret=interpret)

  def loss(lhs, rhs, sizes, ct):
    return jnp.sum(fn(lhs, rhs, sizes).astype(jnp.float32) * ct)

  return jax.jit(fn), jax.jit(jax.grad(loss, argnums=(0, 1)))


def _err(a, b) -> float:
  a, b = np.asarray(jnp.asarray(a, jnp.float32)), np.asarray(jnp.asarray(b, jnp.float32))
  return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def main(argv=None) -> int:
  args = _parse(argv)
  backend = jax.default_backend()
  small = args.small or backend == "cpu"
  problems = SMALL if small else (QUICK if args.quick else PROBLEMS)
  iters = args.iters or (3 if small else (10 if args.quick else 20))
  interpret = args.interpret and backend == "cpu"
  impls = (args.impls.split(",") if args.impls else
           [n for n in api.available_implementations(interpret) if n != "reference"])
  impls = ["xla"] + [i for i in impls if i != "xla"]  # the baseline first
  impls += [f"{i}[{t}]" for t in (args.tiles.split(",") if args.tiles else []) for i in impls
            if i.startswith("pallas")]
  dists = ("skewed",) if args.quick else ("balanced", "skewed")
  print(f"device: {jax.devices()[0].device_kind} ({backend}), jax {jax.__version__}, implementations: {impls}")
  settings = dict(problems=problems, iters=iters, implementations=impls, dtype="bfloat16", distributions=dists,
                  interpret=interpret)
  rows, failed = [], False
  rng = np.random.default_rng(0)
  ref_fwd, ref_bwd = _fns("reference", False)
  for name, g, m, k, n in problems:
    lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), jnp.bfloat16)
    ct = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    for dist in dists:
      sizes = jnp.asarray(group_sizes(rng, dist, g, m))
      rows_in = int(sizes.sum())
      flops = 2.0 * rows_in * k * n
      want = (ref_fwd(lhs, rhs, sizes), *ref_bwd(lhs, rhs, sizes, ct))
      base = {}
      for impl in impls:
        row = dict(problem=name, groups=g, m=m, k=k, n=n, distribution=dist, rows_in_groups=rows_in,
                   empty_groups=int((sizes == 0).sum()), implementation=impl)
        try:
          fwd, bwd = _fns(impl, interpret)
          got = (fwd(lhs, rhs, sizes), *bwd(lhs, rhs, sizes, ct))
          errs = dict(zip(("max_err_out", "max_err_d_lhs", "max_err_d_rhs"), map(_err, got, want)))
          ok = max(errs.values()) <= TOL
          fwd_ms = _time(fwd, lhs, rhs, sizes, iters=iters)
          bwd_ms = _time(bwd, lhs, rhs, sizes, ct, iters=iters)
          if impl == "xla":
            base = dict(fwd=fwd_ms, bwd=bwd_ms)
          row.update(errs, ok=ok, fwd_ms=fwd_ms, fwd_bwd_ms=bwd_ms, fwd_tflops=flops / fwd_ms / 1e9,
                     fwd_bwd_tflops=3 * flops / bwd_ms / 1e9,
                     fwd_vs_xla=base["fwd"] / fwd_ms if base else None,
                     fwd_bwd_vs_xla=base["bwd"] / bwd_ms if base else None)
          failed |= not ok
        except Exception as e:  # noqa: BLE001 - record and go on
          row.update(error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc(limit=4))
          failed = True
        rows.append(row)
        print(json.dumps({k_: v for k_, v in row.items() if k_ != "trace"}), flush=True)
      write_result(args.out, "grouped_matmul", settings, rows, complete=False)
  write_result(args.out, "grouped_matmul", settings, rows, complete=True)
  print(f"\n{'problem':>12} {'dist':>8} {'impl':>10} {'fwd ms':>8} {'fwd+bwd':>8} {'TF/s':>6} {'vs xla':>7} "
        f"{'fb vs xla':>9} {'err':>8}")
  for r in rows:
    if "fwd_ms" in r:
      print(f"{r['problem']:>12} {r['distribution']:>8} {r['implementation']:>10} {r['fwd_ms']:>8.3f} "
            f"{r['fwd_bwd_ms']:>8.3f} {r['fwd_tflops']:>6.1f} {r['fwd_vs_xla'] or 0:>6.2f}x "
            f"{r['fwd_bwd_vs_xla'] or 0:>8.2f}x {max(r['max_err_out'], r['max_err_d_lhs'], r['max_err_d_rhs']):>8.1e}")
    else:
      print(f"{r['problem']:>12} {r['distribution']:>8} {r['implementation']:>10} ERROR {r['error'][:80]}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
