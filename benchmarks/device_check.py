"""The device check: one command for a short GPU lease, checking every kernel and then timing them.

    python benchmarks/device_check.py --out DIR          # a GPU: real (compiled) kernels, benchmark sizes
    python benchmarks/device_check.py --out DIR --cpu    # CPU mode (automatic without a GPU): interpret mode,
                                                         # one case per op, tiny benchmarks

Sections, each in its own process with a time limit (a hung compile cannot eat the lease; one failing case or
section does not stop the rest; the whole run stays under --budget-s, 450 s by default):
  1. kernels: every Pallas kernel (pallas_gpu) and its xla / cudnn siblings against reference.py through
     the public functions, at the test suite's shapes and inputs: the test functions of
     tests/pallas_kernels/ run with the implementation swapped in and their assert_close recorded (max
     error, bound = tol * max(1, max |expected|), pass/fail per case). Flash attention is checked forward
     and backward (dq, dk, dv, lse); split-K decode, paged and ragged paged attention, shared-prefix
     (Hydragen) attention forward; quantized_matmul when its tests are there.
  2. attention: benchmarks/attention.py --quick (flash attention fwd and fwd+bwd vs xla and cudnn).
  3. decode: benchmarks/decode_attention.py --quick (split-K decode, paged and ragged paged attention).
  4. engine: benchmarks/engine_overhead.py --quick --json (recorded "missing" if that file is absent).
  5. grouped_matmul: benchmarks/grouped_matmul.py --quick (MoE grouped matmul: every implementation checked
     forward and backward against the reference, then timed vs ragged_dot; CPU: Pallas in interpret mode).
Writes DIR/device_check.json (everything, rewritten after each section) and DIR/device_check.md (tables),
plus each benchmark's own JSON. Exit status 0 when every kernel case passed and every section ran.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "benchmarks")

# seconds per section (GPU, CPU); unused time passes on to the next section, later budgets stay reserved
BUDGETS = {"kernels": (200, 240), "attention": (100, 90), "decode": (70, 90), "engine": (70, 120)}
SECTIONS = tuple(BUDGETS)
BUDGETS["grouped_matmul"] = (60, 120)  # after the others: it gets what they leave, at least its own
SECTIONS = tuple(BUDGETS)


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="folder for device_check.json, device_check.md and the benchmarks' JSON")
  p.add_argument("--cpu", action="store_true", help="CPU mode (automatic when there is no GPU)")
  p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock limit of the whole run")
  p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
  p.add_argument("--section", default=None, help=argparse.SUPPRESS)  # internal: run one section's body here
  return p.parse_args(argv)


def _write_json(path, obj):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=str)
  os.replace(tmp, path)


# ================================================================================== kernels (child process)


def _param_sets(fn):
  """The keyword sets of a test function's pytest.mark.parametrize marks (cartesian product across marks)."""
  per_mark = []
  for mark in getattr(fn, "pytestmark", []):
    if mark.name != "parametrize":
      continue
    names, values = mark.args[0], mark.args[1]
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    values = [getattr(v, "values", v if len(names) > 1 else (v,)) for v in values]  # pytest.param or plain
    per_mark.append([dict(zip(names, v)) for v in values])
  return [dict(itertools.chain.from_iterable(d.items() for d in combo)) for combo in itertools.product(*per_mark)]


class _Recorder:
  """Stands in for a test module's assert_close: records every comparison, then asserts like the original."""

  def __init__(self, close_error):
    self.close_error = close_error
    self.checks = []

  def __call__(self, actual, expected, tol, what):
    err, scale = self.close_error(actual, expected, what)
    self.checks.append(dict(what=what, max_err=err, bound=tol * scale, ok=bool(err <= tol * scale)))
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:g} * {scale:.3g}"


def _kernel_plan(cpu: bool):
  """[(id, op, impl, module, test function name, kwargs, impl table name or None)] at the test shapes."""
  import test_decode_attention as td
  import test_flash_attention as tf
  import test_paged_attention as tp
  import test_shared_prefix_attention as ts

  first = (lambda xs: list(xs)[:1]) if cpu else list
  flash_impls = ("pallas_gpu", "xla") if cpu else ("pallas_gpu", "xla", "cudnn")
  impls = ("pallas_gpu", "xla")
  plan = []
  for case, impl in itertools.product(first(tf.CASES), flash_impls):
    plan.append((f"flash_attention/{case.name}/{impl}", "flash_attention", impl, tf, "test_matches_reference",
                 dict(case=case, impl=impl), "IMPLS"))
  for case, impl in itertools.product(first(td.CASES), impls):
    plan.append((f"decode_attention/{case.name}/{impl}", "decode_attention", impl, td, "test_matches_reference",
                 dict(case=case, impl=impl), "IMPLS"))
  for case, impl in itertools.product(first(tp.PAGED_CASES), impls):
    plan.append((f"paged_attention/{case.name}/{impl}", "paged_attention", impl, tp, "test_paged_matches_reference",
                 dict(case=case, impl=impl), "PAGED_IMPLS"))
  for case, impl in itertools.product(first(tp.RAGGED_CASES), impls):
    plan.append((f"ragged_paged_attention/{case.name}/{impl}", "ragged_paged_attention", impl, tp,
                 "test_ragged_matches_reference", dict(case=case, impl=impl), "RAGGED_IMPLS"))
  # quantized KV caches (int8 / float8_e4m3fn pages with float32 scales, dequantized inside the kernels)
  for qcase, impl in itertools.product(first(getattr(tp, "QUANT_CASES", ())), impls):
    paged = isinstance(qcase[0], tp.Paged)
    op = "paged_attention" if paged else "ragged_paged_attention"
    plan.append((f"{op}/quant-{qcase[0].name}-{qcase[1]}-k{qcase[2]}/{impl}", op, impl, tp,
                 "test_quantized_matches_reference", dict(qcase=qcase, impl=impl),
                 "PAGED_IMPLS" if paged else "RAGGED_IMPLS"))
  for qcase, impl in itertools.product(first(getattr(td, "QUANT_CASES", ())), impls):
    plan.append((f"decode_attention/quant-{qcase[0].name}-{qcase[1]}-k{qcase[2]}/{impl}", "decode_attention", impl,
                 td, "test_quantized_matches_reference", dict(qcase=qcase, impl=impl), "IMPLS"))
  try:  # newer op folders whose tests follow the same CASES / IMPLS / test_matches_reference convention
    import test_quantized_matmul as tq
    plan += [(f"quantized_matmul/{case.name}/{impl}", "quantized_matmul", impl, tq, "test_matches_reference",
              dict(case=case, impl=impl), "IMPLS") for case, impl in itertools.product(first(tq.CASES), impls)]
  except (ImportError, AttributeError):
    pass  # not there (yet): the other ops still run
  for name in ("test_xla_matches_reference", "test_paged_prefix_xla_matches_reference",
               "test_prefix_plus_suffix_merge_equals_ragged_paged_attention"):
    for i, kw in enumerate(first(_param_sets(getattr(ts, name)))):
      plan.append((f"shared_prefix_attention/{name[5:]}[{i}]/xla", "shared_prefix_attention", "xla", ts, name, kw,
                   None))
  by_op = {}
  for p in plan:
    by_op.setdefault(p[1], []).append(p)
  # interleaved across ops, so a section time limit drops the tail of every op, not whole ops
  return [p for group in itertools.zip_longest(*by_op.values()) for p in group if p is not None]


def _public(op: str, impl: str, interpret: bool):
  """The op's public function with the implementation fixed (ops not re-exported at the top: their folder's)."""
  import importlib

  import pallas_kernels
  fn = getattr(pallas_kernels, op, None)
  if not callable(fn):
    fn = getattr(importlib.import_module(f"pallas_kernels.{op}"), op)
  return functools.partial(fn, implementation=impl, interpret=interpret)


def run_kernels(out_dir: str, cpu: bool) -> int:
  """Runs the kernel plan, one JSON line per case in out_dir/kernels.jsonl (flushed as it goes)."""
  sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "pallas_kernels")]
  import jax

  jax.config.update("jax_default_matmul_precision", "highest")  # as the test suite: float32 means float32
  import testlib

  path = os.path.join(out_dir, "kernels.jsonl")
  with open(path, "w") as f:
    def emit(obj):
      f.write(json.dumps(obj, default=str) + "\n")
      f.flush()

    try:
      plan = _kernel_plan(cpu)
    except Exception as e:  # noqa: BLE001 - reported, and the other sections still run
      emit(dict(planned=[], error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:]))
      return 1
    emit(dict(planned=[p[0] for p in plan]))
    public_op = {"IMPLS": None, "PAGED_IMPLS": "paged_attention", "RAGGED_IMPLS": "ragged_paged_attention"}
    for case_id, op, impl, module, fn_name, kwargs, table in plan:
      rec = _Recorder(testlib.close_error)
      module.assert_close = rec
      if table is not None:
        setattr(module, table, {impl: _public(public_op[table] or op, impl, interpret=cpu)})
      row = dict(id=case_id, op=op, impl=impl)
      start = time.perf_counter()
      try:
        getattr(module, fn_name)(**kwargs)
        row["status"] = "pass"
      except AssertionError as e:
        row.update(status="fail", error=str(e)[:400])
      except ValueError as e:
        cannot = impl == "cudnn" and "cudnn" in str(e).lower()
        row.update(status="unsupported" if cannot else "error", error=f"ValueError: {e}"[:400])
      except Exception as e:  # noqa: BLE001 - one failing case must not stop the others
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:400], traceback=traceback.format_exc()[-1500:])
      row["seconds"] = round(time.perf_counter() - start, 2)
      row["checks"] = rec.checks
      worst = max(rec.checks, key=lambda c: c["max_err"] / c["bound"] if c["bound"] else 0.0, default=None)
      if worst is not None:
        row.update(max_err=worst["max_err"], bound=worst["bound"], worst=worst["what"])
      emit(row)
      print(f"{case_id:70s} {row['status']:11s} {row['seconds']:6.1f}s "
            + (f"err {row['max_err']:.2e} <= {row['bound']:.2e}" if worst else row.get("error", "")[:80]),
            flush=True)
  return 0


# ================================================================================== sections (parent process)


def _subprocess(cmd, timeout_s: float, env) -> dict:
  """Runs cmd in its own process group; kills the group at the time limit. Returns rc, status, output tail."""
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=max(1.0, timeout_s))
    status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    status = f"timeout after {timeout_s:.0f} s"
  return dict(command=" ".join(cmd), status=status, rc=proc.returncode, seconds=round(time.perf_counter() - start, 1),
              output_tail=(out or "")[-3000:])


def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def section_kernels(args, out_dir, timeout_s, env):
  res = _subprocess([sys.executable, os.path.abspath(__file__), "--section", "kernels", "--out", out_dir]
                    + (["--cpu"] if args.cpu else []), timeout_s, env)
  planned, cases = [], []
  try:
    with open(os.path.join(out_dir, "kernels.jsonl")) as f:
      for line in f:
        obj = json.loads(line)
        if "planned" in obj:
          planned = obj["planned"]
          if "error" in obj:
            res["plan_error"] = obj["error"]
        else:
          cases.append(obj)
  except (OSError, ValueError) as e:
    res["read_error"] = str(e)
  done = {c["id"] for c in cases}
  cases += [dict(id=i, op=i.split("/")[0], impl=i.rsplit("/", 1)[-1], status="not run",
                 error=f"section ended: {res['status']}") for i in planned if i not in done]
  res["cases"] = cases
  counts = {}
  for c in cases:
    counts[c["status"]] = counts.get(c["status"], 0) + 1
  res["counts"] = counts
  return res


def section_attention(args, out_dir, timeout_s, env):
  path = os.path.join(out_dir, "attention.json")
  cmd = [sys.executable, os.path.join(HERE, "attention.py"), "--quick", "--out", path]
  cpu_sizes = ["--small", "--seqs", "128", "--tokens", "128", "--iters", "2"]
  cmd += cpu_sizes if args.cpu else ["--reference-max-seq", "1024"]
  res = _subprocess(cmd, timeout_s, env)
  data = _read_json(path)
  res["file"] = "attention.json" if data else None
  res["rows"] = [{k: r.get(k) for k in ("seq", "batch", "causal", "impl", "fwd_ms", "fwd_bwd_ms", "fwd_speedup_vs_xla",
                                        "fwd_bwd_speedup_vs_xla", "fwd_speedup_vs_cudnn", "fwd_bwd_speedup_vs_cudnn",
                                        "max_err_out", "max_err_grad", "ok", "error")}
                 for r in (data or {}).get("rows", [])]
  return res


def section_decode(args, out_dir, timeout_s, env):
  path = os.path.join(out_dir, "decode_attention.json")
  res = _subprocess([sys.executable, os.path.join(HERE, "decode_attention.py"), "--quick", "--repeats",
                     "3" if args.cpu else "10", "--out", path], timeout_s, env)
  data = _read_json(path)
  res["file"] = "decode_attention.json" if data else None
  res["copy_bandwidth_gb_per_s"] = (data or {}).get("copy_bandwidth_gb_per_s")
  keys = ("op", "impl", "batch", "kv_len", "time_ms", "kv_gb_per_s", "fraction_of_copy_bw", "speedup_vs_xla",
          "max_rel_err_vs_baseline", "error")
  res["rows"] = [{k: r.get(k) for k in keys}
                 for r in (data or {}).get("rows", [])]
  return res


def section_engine(args, out_dir, timeout_s, env):
  script = os.path.join(HERE, "engine_overhead.py")
  if not os.path.exists(script):
    return dict(status="missing", seconds=0.0, note="benchmarks/engine_overhead.py does not exist in this tree")
  path = os.path.join(out_dir, "engine_overhead.json")
  res = _subprocess([sys.executable, script, "--quick", "--json", path], timeout_s, env)
  res["file"] = "engine_overhead.json" if os.path.exists(path) else None
  res["result"] = _read_json(path)
  return res


RUNNERS = {"kernels": section_kernels, "attention": section_attention, "decode": section_decode,
           "engine": section_engine}


def section_grouped_matmul(args, out_dir, timeout_s, env):
  path = os.path.join(out_dir, "grouped_matmul.json")
  cmd = [sys.executable, os.path.join(HERE, "grouped_matmul.py"), "--quick", "--out", path]
  cmd += ["--small", "--interpret", "--iters", "1", "--impls", "xla,pallas_gpu"] if args.cpu else []
  res = _subprocess(cmd, timeout_s, env)
  data = _read_json(path)
  res["file"] = "grouped_matmul.json" if data else None
  keys = ("problem", "distribution", "implementation", "fwd_ms", "fwd_bwd_ms", "fwd_tflops", "fwd_vs_xla",
          "fwd_bwd_vs_xla", "max_err_out", "max_err_d_lhs", "max_err_d_rhs", "ok", "error")
  res["rows"] = [{k: r.get(k) for k in keys} for r in (data or {}).get("rows", [])]
  return res


RUNNERS["grouped_matmul"] = section_grouped_matmul


def _grouped_matmul_lines(report) -> list:
  s = report["sections"].get("grouped_matmul")
  if not s or not s.get("rows"):
    return []
  lines = ["", "## Grouped matmul (benchmarks/grouped_matmul.py --quick)", ""]
  return lines + _table(["problem", "group sizes", "impl", "fwd ms", "fwd+bwd ms", "fwd TFLOP/s", "fwd vs xla",
                         "fwd+bwd vs xla", "max err (out, d lhs, d rhs)", "check"],
                        [(r["problem"], r["distribution"], r["implementation"], r["fwd_ms"], r["fwd_bwd_ms"],
                          r["fwd_tflops"], r["fwd_vs_xla"], r["fwd_bwd_vs_xla"],
                          ", ".join(_fmt(r[k], ".1e") for k in ("max_err_out", "max_err_d_lhs", "max_err_d_rhs")),
                          ("ok" if r["ok"] else "MISMATCH") if r.get("error") is None else r["error"][:60])
                         for r in s["rows"]])


# ================================================================================================ report


def _fmt(x, spec=".3g"):
  if x is None:
    return "-"
  if isinstance(x, bool):
    return str(x)
  if isinstance(x, float):
    return format(x, spec)
  return str(x)


def _table(head, rows):
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
  return lines


def markdown(report) -> str:
  env = report["environment"]
  lines = [f"# Device check ({report['mode']} mode)", "",
           f"{env.get('device')} ({env.get('backend')}), jax {env.get('jax')}, python {env.get('python')}, "
           f"commit {env.get('commit')}, {report['date']}; total {report.get('seconds', 0):.0f} s "
           f"of a {report['budget_s']:.0f} s budget.", "", "## Sections", ""]
  lines += _table(["section", "status", "seconds", "file"],
                  [(n, s.get("status"), s.get("seconds"), s.get("file", "-")) for n, s in report["sections"].items()])
  k = report["sections"].get("kernels")
  if k:
    lines += ["", f"## Kernels against reference ({k.get('counts')})", ""]
    lines += _table(["case", "impl", "status", "max err", "bound", "worst", "s"],
                    [(c["id"].rsplit("/", 1)[0], c["impl"], c["status"], c.get("max_err"), c.get("bound"),
                      c.get("worst", c.get("error", "")[:60]), c.get("seconds")) for c in k.get("cases", [])])
  a = report["sections"].get("attention")
  if a and a.get("rows"):
    lines += ["", "## Flash attention (benchmarks/attention.py --quick)", ""]
    lines += _table(["seq", "batch", "causal", "impl", "fwd ms", "fwd+bwd ms", "fwd vs xla", "fwd+bwd vs xla",
                     "fwd vs cudnn", "fwd+bwd vs cudnn", "check"],
                    [(r["seq"], r["batch"], r["causal"], r["impl"], r["fwd_ms"], r["fwd_bwd_ms"],
                      r["fwd_speedup_vs_xla"], r["fwd_bwd_speedup_vs_xla"], r["fwd_speedup_vs_cudnn"],
                      r["fwd_bwd_speedup_vs_cudnn"],
                      ("ok" if r["ok"] else "MISMATCH") if r.get("error") is None else r["error"][:60])
                     for r in a["rows"]])
  d = report["sections"].get("decode")
  if d and d.get("rows"):
    lines += ["", f"## Decode-time attention (benchmarks/decode_attention.py --quick; copy bandwidth "
                  f"{_fmt(d.get('copy_bandwidth_gb_per_s'))} GB/s)", ""]
    lines += _table(["op", "impl", "batch", "kv_len", "ms", "GB/s", "of copy bw", "vs xla", "rel err"],
                    [(r["op"], r["impl"], r["batch"], r["kv_len"], r["time_ms"], r["kv_gb_per_s"],
                      r["fraction_of_copy_bw"], r["speedup_vs_xla"], r["max_rel_err_vs_baseline"]) for r in d["rows"]])
  e = report["sections"].get("engine")
  if e:
    lines += ["", "## Engine (benchmarks/engine_overhead.py --quick)", "", f"status: {e.get('status')}"]
    if e.get("result") is not None:
      lines += ["", "```json", json.dumps(e["result"], indent=1, default=str)[:4000], "```"]
  lines += _grouped_matmul_lines(report)
  return "\n".join(lines) + "\n"


def _environment(env):
  probe = ("import jax, json; d = jax.devices()[0]; "
           "print(json.dumps(dict(jax=jax.__version__, backend=jax.default_backend(), device=d.device_kind, "
           "device_count=jax.device_count())))")
  res = _subprocess([sys.executable, "-c", probe], 120, env)
  try:
    info = json.loads(res["output_tail"].strip().splitlines()[-1])
  except (ValueError, IndexError):
    info = dict(backend="unknown", probe_error=res["output_tail"][-500:])
  try:
    info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                    timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    info["commit"] = None
  info.update(python=platform.python_version(), host=platform.node())
  return info


def main(argv=None) -> int:
  args = _parse(argv)
  out_dir = os.path.abspath(args.out)
  os.makedirs(out_dir, exist_ok=True)
  if args.section == "kernels":
    return run_kernels(out_dir, args.cpu)

  start = time.perf_counter()
  env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false")
  env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
  if args.cpu:
    env["JAX_PLATFORMS"] = "cpu"
  environment = _environment(env)
  if environment.get("backend") != "gpu" and not args.cpu:
    args.cpu = True  # no GPU here: CPU mode
    env["JAX_PLATFORMS"] = "cpu"
  mode = "cpu" if args.cpu else "gpu"
  report = dict(mode=mode, budget_s=args.budget_s, environment=environment, sections={},
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  print(f"device check, {mode} mode: {environment}", flush=True)
  wanted = [s for s in args.sections.split(",") if s]
  unknown = set(wanted) - set(SECTIONS)
  if unknown:
    raise SystemExit(f"--sections: unknown {sorted(unknown)}; choose from {SECTIONS}")
  budgets = {s: BUDGETS[s][1 if args.cpu else 0] for s in wanted}
  for i, name in enumerate(wanted):
    remaining = args.budget_s - (time.perf_counter() - start)
    reserved = sum(budgets[s] for s in wanted[i + 1:])
    timeout_s = min(remaining, max(budgets[name], remaining - reserved))
    if timeout_s < 5:
      report["sections"][name] = dict(status="not run (run budget spent)", seconds=0.0)
    else:
      print(f"\n== {name} (limit {timeout_s:.0f} s)", flush=True)
      report["sections"][name] = RUNNERS[name](args, out_dir, timeout_s, env)
      print(f"== {name}: {report['sections'][name]['status']} in {report['sections'][name]['seconds']} s", flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    _write_json(os.path.join(out_dir, "device_check.json"), report)
    with open(os.path.join(out_dir, "device_check.md"), "w") as f:
      f.write(markdown(report))
  k = report["sections"].get("kernels", {})
  all_pass = all(c["status"] in ("pass", "unsupported") for c in k.get("cases", [])) and bool(k.get("cases"))
  ran = all(s.get("status") in ("ok", "missing") for s in report["sections"].values())
  print(f"\nwrote {out_dir}/device_check.json and device_check.md in {report['seconds']} s; kernels "
        f"{k.get('counts')}; sections {[(n, s.get('status')) for n, s in report['sections'].items()]}")
  return 0 if (all_pass or "kernels" not in wanted) and ran else 1


if __name__ == "__main__":
  sys.exit(main())
