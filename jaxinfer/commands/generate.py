"""`jaxinfer generate`: load a Hugging Face directory (or build a model from the config) and print text.

Reads the `generate` section (jaxinfer.generation.config.GenerateConfig) and the optional `engine` section
(jaxinfer.engine.config.EngineConfig; `--config.engine.page_size=32` and the like). Generation runs on
jaxinfer.Engine (paged KV cache, continuous batching); engine fields left at None are sized for the prompts
(the pool holds every prompt at once).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from jaxinfer.checkpoint.hf import load_hf, read_config
from jaxinfer.commands.inference_mesh import inference_mesh
from jaxinfer.config import ConfigError, from_section
from jaxinfer.engine import Engine, EngineConfig, RequestRejected
from jaxinfer.generation.config import GenerateConfig
from jaxinfer.models.config import ModelConfig
from jaxinfer.models.transformer import init_model
from jaxinfer.tokenizer import tokenizer_for

log = logging.getLogger("jaxinfer.generate")


def engine_config_for(prompts, max_new_tokens: int, section=None) -> EngineConfig:
  """The `engine` section (defaults where absent), with the batch and the pool sized for these prompts unless
  the section sets them."""
  given = {} if section is None else (section.to_dict() if hasattr(section, "to_dict") else dict(section))
  cfg = from_section(EngineConfig, given, "engine")
  sizes = {}
  if "max_batch_size" not in given:
    sizes["max_batch_size"] = min(len(prompts), 32)
  if cfg.num_pages is None:
    sizes["num_pages"] = max(1, sum(-(-(len(p) + max_new_tokens) // cfg.page_size) for p in prompts))
  if "max_step_tokens" not in given:
    sizes["max_step_tokens"] = max(256, sizes.get("max_batch_size", cfg.max_batch_size))
  return dataclasses.replace(cfg, **sizes)


def run(config) -> list[str]:
  gen = from_section(GenerateConfig, config.generate, "generate")
  sampling = gen.sampling()
  cfg = from_section(ModelConfig, config.model, "model")  # validated even when a checkpoint replaces it
  # the mesh section (if any) is checked against the model before any weight is read
  mesh = inference_mesh(config.get("mesh"), read_config(gen.checkpoint) if gen.checkpoint else cfg)
  if gen.checkpoint:
    model = load_hf(gen.checkpoint, mesh=mesh)
    log.info("loaded %s (%s, %d layers)", gen.checkpoint, model.config.model_type, model.config.num_layers)
  else:
    model = init_model(cfg, seed=config.seed, mesh=mesh)
    log.info("no checkpoint: randomly initialised %s model from the config (seed %d)", cfg.model_type, config.seed)
  tokenizer = tokenizer_for(gen.checkpoint or None, model.config.vocab_size)
  texts = gen.texts
  prompts = [tokenizer.encode(t) for t in texts]
  eos = model.config.eos_token_id
  stop = () if (eos is None or not gen.stop_at_eos) else (tuple(eos) if isinstance(eos, tuple) else (eos,))
  start = time.perf_counter()
  engine_cfg = engine_config_for(prompts, gen.max_new_tokens, config.get("engine"))
  if engine_cfg.max_model_len is None:
    engine_cfg = dataclasses.replace(engine_cfg, max_model_len=model.config.max_position_embeddings)
  engine = Engine(model, engine_cfg)
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
