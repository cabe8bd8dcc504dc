from jaxinfer.config import ConfigError
from jaxinfer.models.config import ModelConfig, SUPPORTED_MODEL_TYPES
from jaxinfer.models.kv_cache import KVCache
from jaxinfer.models.transformer import Transformer, init_model

__all__ = ["ConfigError", "ModelConfig", "SUPPORTED_MODEL_TYPES", "KVCache", "Transformer", "init_model"]
