"""ServeConfig: the `serve` section of `jaxinfer serve --config experiments/serve.py`."""

from __future__ import annotations

import dataclasses

from jaxinfer.config.schema import ConfigError, path_field


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  SECTION = "serve"

  # a Hugging Face directory (config.json, *.safetensors, tokenizer.json); empty: results/quickstart/hf when it
  # exists (against the current directory), else a small random model with a byte-level tokenizer
  checkpoint: str = path_field("")
  host: str = "127.0.0.1"
  port: int = 8000
  model_name: str = ""  # the id clients name; empty: the checkpoint folder's name ("quickstart", "random-bytes")
  chat_template: str = path_field("")  # a .jinja file replacing the checkpoint's chat template
  max_queue: int = 256  # most requests accepted but not yet admitted by the engine; beyond: 429
  warmup: bool = False  # compile every engine step shape before accepting requests
  drain_timeout_s: float = 600.0  # SIGTERM: longest wait for running requests before exiting anyway
  stop_at_eos: bool = True  # the model's eos token ends a request
  random_vocab_size: int = 256  # the random model (no checkpoint, no quickstart export): byte-level vocabulary
  random_num_layers: int = 2
  random_hidden_size: int = 64
  random_max_len: int = 512

  def __post_init__(self):
    def need(ok, field, message):
      if not ok:
        raise ConfigError(f"serve.{field}: {message}")

    need(isinstance(self.port, int) and 0 <= self.port < 65536, "port", f"must be in [0, 65536), got {self.port!r}")
    need(bool(self.host), "host", "empty")
    need(isinstance(self.max_queue, int) and self.max_queue >= 1, "max_queue", f"must be >= 1, got {self.max_queue!r}")
    need(self.drain_timeout_s > 0, "drain_timeout_s", f"must be > 0, got {self.drain_timeout_s}")
    need(self.random_vocab_size >= 256, "random_vocab_size",
         f"the byte-level tokenizer needs >= 256 ids, got {self.random_vocab_size}")
    for name in ("random_num_layers", "random_hidden_size", "random_max_len"):
      need(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
    need(self.random_hidden_size % 16 == 0, "random_hidden_size",
         f"must be a multiple of 16 (4 heads of a head_dim that is a multiple of 4), got {self.random_hidden_size}")
