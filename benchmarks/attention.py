"""Checks and times every flash_attention implementation available on this machine, in one call.

    python benchmarks/attention.py --out results/attention.json            # GPU/TPU: seq 1k/4k/16k
    python benchmarks/attention.py --small --out /tmp/attention_cpu.json   # CPU (automatic on a CPU backend)
    python benchmarks/attention.py --quick --out DIR/attention.json        # seq 1k/4k, 5 runs (device check)

Importable: `main(["--quick", "--out", path])` runs the same and returns the exit status.

For each sequence length and causal/non-causal, every available implementation (reference, xla,
pallas_gpu, pallas_tpu, cudnn; see `available_implementations`) is
  1. checked: output and dq/dk/dv (random cotangent) against the reference where it fits in memory
     (seq <= --reference-max-seq), else against "xla"; bf16 tolerances as in the test suite;
  2. timed: forward, and forward+backward (jax.vjp), median of --iters runs after warm-up.
The table gives milliseconds, TFLOP/s (matmul FLOPs: 4*b*h*q*k*d forward, 3.5x that for forward+backward,
causal counted as half) and speed-up ratios against "xla" and "cudnn" measured in the same run (">1" means
faster than the baseline). The JSON file holds the same rows plus device, JAX version and settings. Absolute
numbers belong in docs/benchmarks.md only when taken on a GPU/TPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels.flash_attention import _common, api  # noqa: E402

_TOL = {"float32": (1e-4, 1e-4), "bfloat16": (2e-2, 3e-2), "float16": (5e-3, 1e-2)}  # (out, grads)


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="path of the JSON results file")
  p.add_argument("--small", action="store_true", help="CPU-sized problems (automatic when the backend is cpu)")
  p.add_argument("--quick", action="store_true", help="fewer sizes and runs (seq 1k/4k, 5 runs; CPU: seq 256)")
  p.add_argument("--seqs", default=None, help="comma-separated sequence lengths (default 1024,4096,16384)")
  p.add_argument("--tokens", type=int, default=None, help="batch = max(1, tokens // seq) (default 16384)")
  p.add_argument("--q-heads", type=int, default=None)
  p.add_argument("--kv-heads", type=int, default=None)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--dtype", default="bfloat16", choices=sorted(_TOL))
  p.add_argument("--impls", default=None, help="comma-separated implementations (default: all available)")
  p.add_argument("--iters", type=int, default=None, help="timed runs per measurement (default 10; 3 small)")
  p.add_argument("--reference-max-seq", type=int, default=4096,
                 help="longest sequence for which the dense reference is run (it materialises q x k scores)")
  return p.parse_args(argv)


def _commit():
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or None
  except Exception:  # noqa: BLE001 - best effort only
    return None


def _time(fn, *args, iters: int) -> float:
  """Median wall time in ms (after two warm-up calls, which also compile)."""
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def _max_err(a, b) -> float:
  a = np.asarray(jnp.asarray(a, jnp.float32))
  b = np.asarray(jnp.asarray(b, jnp.float32))
  return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def _jitted(name: str, causal: bool):
  """(forward, forward+backward) jitted for one implementation and mask."""
  module = api.OP.module(name)
  attn = lambda q, k, v: module.flash_attention(q, k, v, causal=causal)

  @jax.jit
  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(attn, q, k, v)
    return out, vjp(do)

  return jax.jit(attn), fwd_bwd


def write_result(path, benchmark: str, settings, rows, *, complete: bool):
  """The JSON record every benchmark writes (device, JAX version, commit, settings, rows), atomically: written
  to a temporary name, then renamed. Also used by quantized_matmul.py and grouped_matmul.py."""
  result = {
      "benchmark": benchmark, "complete": complete,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax_version": jax.__version__,
      "commit": _commit(), "settings": settings, "rows": rows,
  }
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2)
  os.replace(tmp, path)


def main(argv=None) -> int:
  args = _parse(argv)
  backend = jax.default_backend()
  small = args.small or backend == "cpu"
  default_seqs = ([256] if args.quick else [256, 512, 1024]) if small else (
      [1024, 4096] if args.quick else [1024, 4096, 16384])
  seqs = [int(s) for s in args.seqs.split(",")] if args.seqs else default_seqs
  tokens = args.tokens or ((256 if args.quick else 1024) if small else 16384)
  q_heads = args.q_heads or (4 if small else 16)
  kv_heads = args.kv_heads or q_heads
  d = args.head_dim
  dtype = jnp.dtype(args.dtype)
  iters = args.iters or (3 if small else (5 if args.quick else 10))
  impls = args.impls.split(",") if args.impls else api.available_implementations()
  if "xla" not in impls:
    impls = ["xla"] + impls  # the baseline every ratio refers to
  tol_out, tol_grad = _TOL[args.dtype]
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({backend}), jax {jax.__version__}, implementations: {impls}")
  print(f"shapes: seqs {seqs}, batch = max(1, {tokens} // seq), q_heads {q_heads}, kv_heads {kv_heads}, "
        f"head_dim {d}, {args.dtype}; {iters} timed runs (median)\n")

  settings = dict(seqs=seqs, tokens=tokens, q_heads=q_heads, kv_heads=kv_heads, head_dim=d, dtype=args.dtype,
                  iters=iters, small=small, implementations=impls,
                  flops="4*b*h*s*s*d forward, x3.5 forward+backward, causal /2")
  rows = []
  for seq in seqs:
    batch = max(1, tokens // seq)
    ks = jax.random.split(jax.random.key(seq), 4)
    q = jax.random.normal(ks[0], (batch, seq, q_heads, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (batch, seq, kv_heads, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (batch, seq, kv_heads, d), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], q.shape, jnp.float32).astype(dtype)
    for causal in (True, False):
      checker = "reference" if seq <= args.reference_max_seq else "xla"
      run_impls = [n for n in impls if n != "reference" or seq <= args.reference_max_seq]
      expected = None
      fwd_flops = _common.flops(batch, seq, seq, q_heads, d, causal=causal)
      fb_flops = _common.flops(batch, seq, seq, q_heads, d, causal=causal, with_backward=True)
      for name in [checker] + [n for n in run_impls if n != checker]:
        row = dict(seq=seq, batch=batch, q_heads=q_heads, kv_heads=kv_heads, head_dim=d, dtype=args.dtype,
                   causal=causal, impl=name, checked_against=checker)
        try:
          fwd, fb = _jitted(name, causal)
          out, grads = fb(q, k, v, do)
          if name == checker:
            expected = (out, grads)
            row["max_err_out"] = row["max_err_grad"] = 0.0
          else:
            row["max_err_out"] = _max_err(out, expected[0])
            row["max_err_grad"] = max(_max_err(g, e) for g, e in zip(grads, expected[1]))
          row["ok"] = row["max_err_out"] <= tol_out and row["max_err_grad"] <= tol_grad
          row["fwd_ms"] = _time(fwd, q, k, v, iters=iters)
          row["fwd_bwd_ms"] = _time(fb, q, k, v, do, iters=iters)
          row["fwd_tflops"] = fwd_flops / row["fwd_ms"] / 1e9
          row["fwd_bwd_tflops"] = fb_flops / row["fwd_bwd_ms"] / 1e9
        except Exception as e:  # noqa: BLE001 - one failing implementation must not stop the others
          row["error"] = f"{type(e).__name__}: {e}"[:500]
          row["ok"] = False
          if os.environ.get("BENCH_DEBUG"):
            traceback.print_exc()
        rows.append(row)
        print(f"  seq {seq:6d} causal={causal!s:5} {name:11s} "
              + (f"fwd {row['fwd_ms']:9.2f} ms  fwd+bwd {row['fwd_bwd_ms']:9.2f} ms  "
                 f"err {row['max_err_out']:.1e}/{row['max_err_grad']:.1e} {'ok' if row['ok'] else 'MISMATCH'}"
                 if "error" not in row else f"ERROR {row['error'][:150]}"), flush=True)

    write_result(args.out, "flash_attention", settings, rows, complete=False)  # what is measured so far survives

  # Ratios against the baselines measured in this run.
  for row in rows:
    for base in ("xla", "cudnn"):
      ref = next((r for r in rows if r["impl"] == base and r["seq"] == row["seq"] and r["causal"] == row["causal"]
                  and "error" not in r), None)
      if ref is not None and "error" not in row:
        row[f"fwd_speedup_vs_{base}"] = ref["fwd_ms"] / row["fwd_ms"]
        row[f"fwd_bwd_speedup_vs_{base}"] = ref["fwd_bwd_ms"] / row["fwd_bwd_ms"]

  has_cudnn = any(r["impl"] == "cudnn" and "error" not in r for r in rows)
  head = (f"\n{'seq':>6} {'causal':>6} {'impl':>11} | {'fwd ms':>9} {'TFLOP/s':>8} {'vs xla':>7}"
          + (f" {'vs cudnn':>8}" if has_cudnn else "")
          + f" | {'fwd+bwd ms':>10} {'TFLOP/s':>8} {'vs xla':>7}" + (f" {'vs cudnn':>8}" if has_cudnn else "")
          + f" | {'check':>8}")
  print(head)
  print("-" * len(head))
  for r in rows:
    if "error" in r:
      print(f"{r['seq']:>6} {r['causal']!s:>6} {r['impl']:>11} | error: {r['error'][:100]}")
      continue
    cud = lambda key: f" {r.get(key, float('nan')):>8.2f}" if has_cudnn else ""
    print(f"{r['seq']:>6} {r['causal']!s:>6} {r['impl']:>11} | {r['fwd_ms']:>9.2f} {r['fwd_tflops']:>8.3f} "
          f"{r.get('fwd_speedup_vs_xla', float('nan')):>7.2f}{cud('fwd_speedup_vs_cudnn')} | "
          f"{r['fwd_bwd_ms']:>10.2f} {r['fwd_bwd_tflops']:>8.3f} {r.get('fwd_bwd_speedup_vs_xla', float('nan')):>7.2f}"
          f"{cud('fwd_bwd_speedup_vs_cudnn')} | {'ok' if r['ok'] else 'MISMATCH':>8}")

  write_result(args.out, "flash_attention", settings, rows, complete=True)
  print(f"\nwrote {args.out}")
  return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
