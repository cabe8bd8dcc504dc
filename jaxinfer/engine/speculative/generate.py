"""jaxinfer.generate(..., speculative=...): the prompts through an Engine with that speculative method.

Same seeds as generate (prompt i samples with sampling.seed + i) and the same stop rule, so greedy outputs
are generate's tokens and sampled ones follow generate's distribution. The engine is sized to the call: the
whole batch runs at once, every step padded to one token bucket (one step program per sample-row bucket)."""

from __future__ import annotations

from jaxinfer.generation.generate import bucket


def speculative_generate(model, prompts, max_new_tokens, sampling, stop_token_ids, speculative):
  from jaxinfer.engine.engine import Engine

  batch = min(bucket(len(prompts), minimum=1), 64)
  rows = batch * (speculative.num_speculative_tokens + 1)
  tokens = bucket(max(rows, min(sum(len(p) for p in prompts), 512)))
  longest = max(len(p) for p in prompts) + max_new_tokens
  engine = Engine(model, max_batch_size=batch, min_seq_bucket=batch, max_step_tokens=tokens, min_token_bucket=tokens,
                  async_scheduling=False, max_model_len=min(model.config.max_position_embeddings, bucket(longest)),
                  speculative=speculative)
  return engine.run([list(p) for p in prompts], sampling, max_new_tokens, stop_token_ids, progress=False)
