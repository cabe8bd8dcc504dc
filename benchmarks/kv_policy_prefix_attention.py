"""KV policies with shared-prefix (Hydragen) attention: engine decode tokens/s of `batch` requests sharing a
long prefix, each with a short suffix of its own, with prefix grouping on against the same policy alone.

  python benchmarks/kv_policy_prefix_attention.py                       # prefixes 512 and 1024, batch 16
  python benchmarks/kv_policy_prefix_attention.py --prefix-lens 256 --batch 8 --json out.json

The workload and timing are prefix_sharing's engine_decode part (jaxinfer/experiments/prefix_sharing.py,
_decode_case): the prefix is prefilled once and every request reuses its pages through the prefix cache; after
warm-up steps (compiles), `decode_steps` decode steps are timed; "alone" and "grouped" are the same engine,
pool and cached pages with scheduler.group_prefixes off / on (off runs exactly the policy's own path, as
enable_shared_prefix_attention=False does), interleaved rounds, the best kept. Ratios only (CPU).

Policies: streaming with a window covering every sequence (plain view throughout: grouped), snapkv with a
budget above the prompts (never compacted: grouped) and below them (compacted: never grouped), h2o (scores
every row: never grouped). The model is prefix_sharing's (2 layers, hidden 256, 8 heads, 2 kv heads).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import jaxinfer  # noqa: E402
from jaxinfer.engine.kv_policies import KVPolicyConfig  # noqa: E402
from jaxinfer.experiments.prefix_sharing import EngineDecodePartConfig, _decode_case  # noqa: E402
from jaxinfer.experiments.timing import compare  # noqa: E402


def policies(prefix_len: int, suffix_len: int) -> dict:
  prompt = prefix_len + suffix_len
  return {
      "none (no policy)": dict(name="none"),
      "streaming (window covers all)": dict(name="streaming", sink_tokens=4, window=prompt + 64),
      "snapkv (budget > prompt)": dict(name="snapkv", window=16, budget=prompt + 64),
      "snapkv (budget = prompt / 4)": dict(name="snapkv", window=16, budget=prompt // 4),
      "h2o (budget = prompt / 4)": dict(name="h2o", window=16, budget=prompt // 4),
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--prefix-lens", type=int, nargs="+", default=[512, 1024])
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--suffix-len", type=int, default=15)
  ap.add_argument("--decode-steps", type=int, default=8)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--max-step-tokens", type=int, default=512)
  ap.add_argument("--only", nargs="*", default=None, help="policy names (prefix of the row labels)")
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  step_tokens = max(args.max_step_tokens, args.batch * (args.suffix_len + 1))
  # warm-up steps: the batch's whole prompts may need prefilling (h2o names no pages), then 3 decodes
  warm = -(-args.batch * (max(args.prefix_lens) + args.suffix_len) // step_tokens) + 3
  e = EngineDecodePartConfig(batch=args.batch, page_size=16, suffix_len=args.suffix_len, warm_steps=warm,
                             decode_steps=args.decode_steps, rounds=args.rounds, max_step_tokens=step_tokens,
                             prefix_lens=tuple(args.prefix_lens))
  longest = max(args.prefix_lens) + e.suffix_len + e.warm_steps + e.decode_steps + 16
  cfg = jaxinfer.ModelConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8,
                             num_kv_heads=2, initializer_range=0.2, max_position_embeddings=longest, dtype="float32")
  model = jaxinfer.Transformer(cfg, rngs=nnx.Rngs(0))
  rows = []
  for prefix_len in args.prefix_lens:
    for label, policy in policies(prefix_len, e.suffix_len).items():
      if args.only and not any(label.startswith(o) for o in args.only):
        continue
      per_seq = -(-(prefix_len + e.suffix_len + e.warm_steps + e.decode_steps + 2) // e.page_size) + 1
      engine = jaxinfer.Engine(model, max_batch_size=e.batch, page_size=e.page_size,
                               num_pages=(e.batch + 2) * per_seq, max_step_tokens=e.max_step_tokens,
                               min_token_bucket=e.batch, min_seq_bucket=e.batch, max_model_len=longest,
                               enable_prefix_caching=True, enable_shared_prefix_attention=True,
                               max_prefix_groups=1, kv_policy=KVPolicyConfig(**policy))
      rng = np.random.default_rng(prefix_len)  # the same prompts for every policy
      prefix = rng.integers(0, cfg.vocab_size, size=prefix_len).tolist()
      engine.run([prefix], max_new_tokens=1, progress=False)  # prefilled once (pages named where the policy lets)
      grouped = label.startswith(("none", "streaming", "snapkv (budget >"))
      cases = {"alone": _decode_case(engine, e, prefix, rng, False)}
      if grouped:
        cases["grouped"] = _decode_case(engine, e, prefix, rng, True)
      else:  # nothing may group: grouping on must cost nothing (the case's check expects no group either)
        case = _decode_case(engine, e, prefix, rng, False)
        setup = case.setup

        def setup_on(setup=setup):
          setup()
          engine.scheduler.group_prefixes = True

        cases["grouped"] = type(case)(case.fn, setup_on, case.teardown)
      c = compare(cases, baseline="alone", rounds=e.rounds, warmup=0, repeats=1, stat="min")
      engine.check_pages()
      groups = engine.stats["shared_prefix_groups"]
      row = dict(prefix_len=prefix_len, policy=label, alone_tok_s=e.batch * e.decode_steps / c.time("alone"),
                 grouped_tok_s=e.batch * e.decode_steps / c.time("grouped"), ratio=c.speedup("grouped"),
                 groups=groups)
      rows.append(row)
      print(f"prefix {prefix_len:5d}  {label:30s} alone {row['alone_tok_s']:8.1f} tok/s  grouping on "
            f"{row['grouped_tok_s']:8.1f} tok/s  ratio {row['ratio']:.2f}x  (groups run: {groups})", flush=True)
  if args.json:
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
      json.dump(rows, f, indent=1)
    os.replace(tmp, args.json)


if __name__ == "__main__":
  main()
