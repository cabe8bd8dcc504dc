"""What `jaxinfer serve` serves: a checkpoint, else the quickstart export, else a small random byte-level model.

`load_served_model(cfg)` returns a ServedModel: the jaxinfer model, a tokenizer with `encode`/`decode`, the chat
template (or None) and the special-token strings the template may use; `describe` is logged at start-up.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from jaxinfer.config.schema import ConfigError
from jaxinfer.serve import chat_template as templates
from jaxinfer.tokenizer import ByteTokenizer, HFTokenizer

log = logging.getLogger("jaxinfer.serve")

QUICKSTART_EXPORT = "results/quickstart/hf"  # resolved against the current directory


@dataclasses.dataclass
class ServedModel:
  name: str
  model: object  # a jaxinfer Transformer
  tokenizer: object  # encode(text) -> ids, decode(ids) -> text
  chat_template: str | None
  template_source: str  # where the template came from, for messages
  special_tokens: dict  # bos_token / eos_token strings for the template
  eos_ids: tuple[int, ...]
  describe: str

  @property
  def vocab_size(self) -> int:
    return self.model.config.vocab_size


def _eos_ids(model_config) -> tuple[int, ...]:
  eos = model_config.eos_token_id
  if eos is None:
    return ()
  return tuple(eos) if isinstance(eos, tuple) else (int(eos),)


def _is_training_export(path: Path) -> bool:
  """A `<workdir>/hf` folder written by `jaxinfer train` (the quickstart export): it gets the simple template."""
  config = path.parent / "resolved_config.json"
  if path.name != "hf" or not config.is_file():
    return False
  try:
    return "train" in json.loads(config.read_text())
  except (OSError, json.JSONDecodeError):
    return False


def from_checkpoint(path: Path, name: str, stop_at_eos: bool, template_file: str = "", mesh_section=None
                    ) -> ServedModel:
  from jaxinfer.checkpoint.hf import load_hf, load_tokenizer, read_config
  from jaxinfer.commands.inference_mesh import inference_mesh

  if not (path / "config.json").is_file():
    raise ConfigError(f"serve.checkpoint: {path} has no config.json (a Hugging Face model folder is expected)")
  model = load_hf(path, mesh=inference_mesh(mesh_section, read_config(path)))
  tokenizer = (HFTokenizer(load_tokenizer(path)) if (path / "tokenizer.json").is_file()
               else _byte_tokenizer(model.config.vocab_size, f"serve.checkpoint: {path}"))
  template, source = templates.from_checkpoint(path)
  if template is None and _is_training_export(path):
    template, source = templates.SIMPLE_TEMPLATE, "jaxinfer's simple template (a jaxinfer training export)"
  if template_file:
    template, source = Path(template_file).read_text(), template_file
  return ServedModel(name or _folder_name(path), model, tokenizer, template, source,
                     templates.special_tokens(path), _eos_ids(model.config) if stop_at_eos else (),
                     f"checkpoint {path} ({model.config.model_type}, {model.config.num_layers} layers, "
                     f"vocab {model.config.vocab_size}; chat template: {source})")


def _folder_name(path: Path) -> str:
  return path.parent.name if path.name == "hf" else path.name  # results/quickstart/hf -> "quickstart"


def _byte_tokenizer(vocab: int, where: str):
  if vocab < 256:
    raise ConfigError(f"{where}: no tokenizer.json and vocab_size={vocab} < 256: no byte-level fallback")
  return ByteTokenizer()


def random_model(cfg, name: str = "", template_file: str = "", seed: int = 0, mesh_section=None) -> ServedModel:
  import jaxinfer
  from jaxinfer.commands.inference_mesh import inference_mesh

  heads = 4
  mc = jaxinfer.ModelConfig(vocab_size=cfg.random_vocab_size, hidden_size=cfg.random_hidden_size,
                            intermediate_size=cfg.random_hidden_size * 2, num_layers=cfg.random_num_layers,
                            num_heads=heads, num_kv_heads=2, max_position_embeddings=cfg.random_max_len,
                            initializer_range=0.2)
  model = jaxinfer.init_model(mc, seed=seed, mesh=inference_mesh(mesh_section, mc))
  template, source = templates.SIMPLE_TEMPLATE, "jaxinfer's simple template"
  if template_file:
    template, source = Path(template_file).read_text(), template_file
  return ServedModel(name or "random-bytes", model, ByteTokenizer(), template, source, {}, (),
                     f"a random model (seed {seed}: {mc.num_layers} layers, hidden {mc.hidden_size}, byte-level "
                     f"tokenizer, vocab {mc.vocab_size}, max length {mc.max_position_embeddings}; chat template: "
                     f"{source})")


def load_served_model(cfg, seed: int = 0, mesh_section=None) -> ServedModel:
  """The model `cfg` (a ServeConfig) asks for, with what was chosen logged; sharded over the mesh a `mesh`
  config section describes (None: one device)."""
  if cfg.checkpoint:
    path = Path(cfg.checkpoint)
    if not path.is_dir():
      raise ConfigError(f"serve.checkpoint: {path} is not a folder")
    served = from_checkpoint(path, cfg.model_name, cfg.stop_at_eos, cfg.chat_template, mesh_section)
  elif (Path(os.getcwd()) / QUICKSTART_EXPORT / "config.json").is_file():
    served = from_checkpoint(Path(os.getcwd()) / QUICKSTART_EXPORT, cfg.model_name, cfg.stop_at_eos,
                             cfg.chat_template, mesh_section)
    served.describe = f"the quickstart export: {served.describe}"
  else:
    served = random_model(cfg, cfg.model_name, cfg.chat_template, seed, mesh_section)
    served.describe = (f"no checkpoint and no {QUICKSTART_EXPORT} here: {served.describe}")
  log.info("serving %r: %s", served.name, served.describe)
  return served
