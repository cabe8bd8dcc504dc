"""`jaxinfer generate`: load a Hugging Face directory (or build a model from the config) and print text.

Generation runs on jaxinfer.Engine (paged KV cache, continuous batching). An optional `engine` section in the
config passes keyword arguments to Engine (max_batch_size, page_size, num_pages, max_step_tokens, ...);
without one the pool is sized to hold every prompt at once.
"""

from __future__ import annotations

import logging
import time

from jaxinfer.checkpoint.hf import load_hf
from jaxinfer.configs import model_config_from, require
from jaxinfer.engine import Engine, RequestRejected
from jaxinfer.generation import SamplingParams
from jaxinfer.config import ConfigError
from jaxinfer.models.transformer import init_model
from jaxinfer.tokenizer import tokenizer_for

log = logging.getLogger("jaxinfer.generate")


def sampling_from(section) -> SamplingParams:
  try:
    return SamplingParams(temperature=section.temperature, top_k=section.top_k, top_p=section.top_p,
                          min_p=section.min_p, seed=section.sample_seed)
  except ValueError as e:
    raise ConfigError(f"generate.{str(e).split('.', 1)[1]}") from None


def engine_for(model, prompts, max_new_tokens: int, section=None) -> Engine:
  """An Engine sized for these prompts (every one fits in the pool at once), overridden by `section`."""
  kwargs = dict(max_batch_size=min(len(prompts), 32), page_size=16)
  if section is not None:
    kwargs.update(section.to_dict() if hasattr(section, "to_dict") else dict(section))
  page_size = kwargs["page_size"]
  if kwargs.get("num_pages") is None:
    kwargs["num_pages"] = max(1, sum(-(-(len(p) + max_new_tokens) // page_size) for p in prompts))
  kwargs.setdefault("max_model_len", model.config.max_position_embeddings)
  kwargs.setdefault("max_step_tokens", max(256, kwargs["max_batch_size"]))
  try:
    return Engine(model, **kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"engine: {e}") from None


def run(config) -> list[str]:
  gen = config.generate
  require(gen.max_new_tokens >= 1, "generate.max_new_tokens", f"must be >= 1, got {gen.max_new_tokens}")
  sampling = sampling_from(gen)
  cfg = model_config_from(config.model)  # validated even when a checkpoint replaces it
  if gen.checkpoint:
    model = load_hf(gen.checkpoint)
    log.info("loaded %s (%s, %d layers)", gen.checkpoint, model.config.model_type, model.config.num_layers)
  else:
    model = init_model(cfg, seed=config.seed)
    log.info("no checkpoint: randomly initialised %s model from the config (seed %d)", cfg.model_type, config.seed)
  tokenizer = tokenizer_for(gen.checkpoint or None, model.config.vocab_size)
  texts = list(gen.prompts) if gen.prompts else [gen.prompt]
  prompts = [tokenizer.encode(t) for t in texts]
  eos = model.config.eos_token_id
  stop = () if (eos is None or not gen.stop_at_eos) else (tuple(eos) if isinstance(eos, tuple) else (eos,))
  start = time.perf_counter()
  engine = engine_for(model, prompts, gen.max_new_tokens, config.get("engine"))
  try:
    outputs = engine.run(prompts, sampling, max_new_tokens=gen.max_new_tokens, stop_token_ids=stop)
  except RequestRejected as e:
    raise ConfigError(f"generate.prompt{'s' if gen.prompts else ''}: {e}") from None
  elapsed = time.perf_counter() - start
  decoded = [tokenizer.decode(o) for o in outputs]
  for text, completion in zip(texts, decoded):
    print(f"=== prompt: {text!r}\n{text}{completion}\n")
  log.info("%d new tokens in %.2fs (compile included; %d engine steps, %d preemptions, %d programs compiled)",
           sum(map(len, outputs)), elapsed, engine.stats["steps"], engine.stats["preemptions"],
           engine.compilations)
  return decoded
