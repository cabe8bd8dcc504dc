"""`jaxinfer generate`: load a Hugging Face directory (or build a model from the config) and print text."""

from __future__ import annotations

import logging
import time

from jaxinfer.checkpoint.hf import load_hf
from jaxinfer.configs import model_config_from, require
from jaxinfer.generation import SamplingParams, generate
from jaxinfer.models.config import ConfigError
from jaxinfer.models.transformer import init_model
from jaxinfer.tokenizer import tokenizer_for

log = logging.getLogger("jaxinfer.generate")


def sampling_from(section) -> SamplingParams:
  try:
    return SamplingParams(temperature=section.temperature, top_k=section.top_k, top_p=section.top_p,
                          min_p=section.min_p, seed=section.sample_seed)
  except ValueError as e:
    raise ConfigError(f"generate.{str(e).split('.', 1)[1]}") from None


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
  outputs = generate(model, prompts, gen.max_new_tokens, sampling=sampling, stop_token_ids=stop)
  elapsed = time.perf_counter() - start
  decoded = [tokenizer.decode(o) for o in outputs]
  for text, completion in zip(texts, decoded):
    print(f"=== prompt: {text!r}\n{text}{completion}\n")
  log.info("%d new tokens in %.2fs (compile included)", sum(map(len, outputs)), elapsed)
  return decoded
