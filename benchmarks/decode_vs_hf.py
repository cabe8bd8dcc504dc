"""jaxinfer.generate vs Hugging Face transformers' generate: same random model, same prompts, greedy.

  python benchmarks/decode_vs_hf.py [--new-tokens 128] [--batches 1,8] [--out results/decode_vs_hf.json]

Both run in this process on the same weights (the transformers model is saved with save_pretrained and
loaded with jaxinfer.load_hf). Each side gets one warm-up call (compilation for jaxinfer), then the best of
--repeats timed calls. Prints tokens/s for each and the ratio jaxinfer / transformers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--batches", default="1,8")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default=None, help="write the results as JSON here")
  return p.parse_args()


def best_time(fn, repeats):
  fn()  # warm-up (compilation)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main():
  args = parse_args()
  import jax
  import torch
  import transformers

  import jaxinfer

  config = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
      max_position_embeddings=2048, bos_token_id=None, eos_token_id=None, pad_token_id=0)
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(config).eval()
  hf.generation_config.eos_token_id = None
  hf.generation_config.pad_token_id = 0
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    model = jaxinfer.load_hf(tmp, dtype="float32")

  rng = np.random.default_rng(0)
  rows = []
  for batch in [int(b) for b in args.batches.split(",")]:
    prompts = rng.integers(1, args.vocab, size=(batch, args.prompt_len)).tolist()
    ours_out = {}

    def ours():
      ours_out["tokens"] = jaxinfer.generate(model, prompts, args.new_tokens)

    def theirs():
      with torch.no_grad():
        out = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(batch, args.prompt_len, dtype=torch.long),
                          max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
      ours_out["hf"] = out[:, args.prompt_len:].tolist()

    t_ours = best_time(ours, args.repeats)
    t_hf = best_time(theirs, args.repeats)
    same = sum(a == b for a, b in zip(ours_out["tokens"], ours_out["hf"]))
    n_tokens = batch * args.new_tokens
    rows.append(dict(batch=batch, new_tokens=args.new_tokens, jaxinfer_tok_s=n_tokens / t_ours,
                     transformers_tok_s=n_tokens / t_hf, ratio=t_hf / t_ours, identical_rows=f"{same}/{batch}"))

  print(f"\ndevice: {jax.devices()[0].device_kind}  jax {jax.__version__}  torch {torch.__version__}  "
        f"transformers {transformers.__version__}  torch threads {torch.get_num_threads()}")
  print(f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} q / {args.kv_heads} kv heads, "
        f"vocab {args.vocab}; prompt {args.prompt_len}, greedy {args.new_tokens} new tokens\n")
  print("| batch | jaxinfer tok/s | transformers tok/s | ratio | identical greedy rows |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['batch']} | {r['jaxinfer_tok_s']:.1f} | {r['transformers_tok_s']:.1f} | {r['ratio']:.2f}x | "
          f"{r['identical_rows']} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows, args=vars(args)), f,
                indent=2)


if __name__ == "__main__":
  main()
