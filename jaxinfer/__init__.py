"""jaxinfer: a JAX/XLA research framework for efficient transformer inference and training."""

from jaxinfer.checkpoint import CheckpointError, load_hf, load_tokenizer, save_hf
from jaxinfer.engine import Engine, EngineConfig
from jaxinfer.engine.speculative import SpeculativeConfig
from jaxinfer.generation import SamplingParams, generate
from jaxinfer.models import ConfigError, ModelConfig, Transformer, init_model
from jaxinfer.quant import quantize

__all__ = ["CheckpointError", "ConfigError", "Engine", "EngineConfig", "ModelConfig", "SamplingParams", "SpeculativeConfig", "Transformer", "generate",
           "init_model", "load_hf", "load_tokenizer", "quantize", "save_hf"]
