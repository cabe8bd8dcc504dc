"""jaxinfer.generate(..., speculative=...): the prompts through an Engine with that speculative method.

Same seeds as generate (prompt i samples with sampling.seed + i) and the same stop rule, so greedy outputs
are generate's tokens and sampled ones follow generate's distribution."""

from __future__ import annotations

from jaxinfer.generation.generate import bucket


def speculative_generate(model, prompts, max_new_tokens, sampling, stop_token_ids, speculative):
  from jaxinfer.engine.engine import Engine

  longest = max(len(p) for p in prompts) + max_new_tokens
  engine = Engine(model, max_batch_size=min(bucket(len(prompts), minimum=1), 64), async_scheduling=False,
                  max_model_len=min(model.config.max_position_embeddings, bucket(longest)), speculative=speculative)
  return engine.run([list(p) for p in prompts], sampling, max_new_tokens, stop_token_ids, progress=False)
