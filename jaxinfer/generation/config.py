"""GenerateConfig: the `generate` section (what `jaxinfer generate` prints a completion for), one frozen
validated dataclass; its ml-collections section comes from jaxinfer.config.generate_section()."""

from __future__ import annotations

import dataclasses

from jaxinfer.config.schema import ConfigError, path_field
from jaxinfer.generation.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  SECTION = "generate"

  checkpoint: str = path_field("")  # a Hugging Face directory; empty: a model from config.model with config.seed
  prompt: str = "def fibonacci(n):"
  prompts: tuple = ()  # several prompts at once; overrides `prompt` when non-empty
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  sample_seed: int = 0
  stop_at_eos: bool = True

  def __post_init__(self):
    if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
      raise ConfigError(f"generate.max_new_tokens: must be >= 1, got {self.max_new_tokens!r}")
    if not isinstance(self.prompts, (tuple, list)) or not all(isinstance(p, str) for p in self.prompts):
      raise ConfigError(f"generate.prompts: must be a tuple of strings, got {self.prompts!r}")
    if not self.prompts and not self.prompt:
      raise ConfigError("generate.prompt: empty (and no generate.prompts given)")
    self.sampling()  # the sampling fields are checked by SamplingParams

  def sampling(self) -> SamplingParams:
    try:
      return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                            seed=self.sample_seed)
    except ValueError as e:  # "SamplingParams.top_p must be in (0, 1], got 1.5"
      field, _, rest = str(e).split(".", 1)[1].partition(" ")
      field = "sample_seed" if field == "seed" else field
      raise ConfigError(f"generate.{field}: {rest}") from None

  @property
  def texts(self) -> list[str]:
    return list(self.prompts) if self.prompts else [self.prompt]
