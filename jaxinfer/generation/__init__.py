from jaxinfer.generation.generate import compilation_count, generate
from jaxinfer.generation.sampling import SamplingParams, sample_tokens

__all__ = ["SamplingParams", "compilation_count", "generate", "sample_tokens"]
