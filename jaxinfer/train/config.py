"""Config sections of `jaxinfer train` and their validation (before anything is compiled or written).

An experiment's get_config() returns a ConfigDict with:
  name, seed, workdir          the run; workdir holds checkpoints, metrics.jsonl, results.md, plots, hf/
  model                        jaxinfer.configs.model_section(...)
  data                         jaxinfer.data.data_section(...)
  mesh                         parallel.mesh.mesh_section(...): axis sizes, -1 = the rest of the devices
  sharding_rules               ((logical, mesh axes), ...) pairs, or a preset name of parallel.sharding.RULE_PRESETS
  train                        train_section(...) below
"""

from __future__ import annotations

from ml_collections import config_dict

from jaxinfer.configs import model_config_from, require
from jaxinfer.config import ConfigError
from jaxinfer.models.config import ModelConfig

LAYOUT_NAMES = ("contiguous", "striped", "zigzag")
TOP_LEVEL = ("name", "seed", "workdir", "model", "data", "mesh", "sharding_rules", "train")


def train_section(**overrides) -> config_dict.ConfigDict:
  s = config_dict.ConfigDict()
  s.steps = 100  # the run's length: the learning-rate schedule spans these steps
  s.stop_after = 0  # > 0: stop (with a checkpoint) after this step, e.g. to split a run over time-limited jobs
  s.batch_size = 8  # global rows per optimizer step (all devices, all accumulation steps)
  s.seq_len = 256
  s.grad_accum = 1  # micro-batches per step: each holds batch_size // grad_accum rows
  s.learning_rate = 3e-3
  s.warmup_steps = 10
  s.min_lr_ratio = 0.1  # cosine decay ends at learning_rate * min_lr_ratio
  s.b1 = 0.9
  s.b2 = 0.95
  s.eps = 1e-8
  s.weight_decay = 0.1
  s.grad_clip = 1.0  # global-norm clipping; 0 disables
  s.remat = "none"  # none | full | dots | dots_no_batch (jaxinfer.train.remat.POLICIES)
  s.sequence_layout = "contiguous"  # with mesh.sequence > 1: contiguous | striped | zigzag
  s.eval_every = 50  # steps; 0: only at the end
  s.eval_batches = 4  # held-out batches of batch_size rows (at most the whole held-out split)
  s.checkpoint_every = 50  # steps; the last step is always saved
  s.keep_checkpoints = 3
  s.async_checkpoint = True
  s.peak_flops_per_device = 0.0  # 0: from the device kind (see jaxinfer.train.flops)
  s.progress = True  # tqdm bar
  s.export_hf = True  # workdir/hf: config.json + model.safetensors + tokenizer.json
  s.sample_prompts = ("def ", "import ", "class ")
  s.sample_tokens = 48
  s.sample_temperature = 0.7
  s.sample_top_k = 40
  for key, value in overrides.items():
    if key not in s:
      raise ConfigError(f"train.{key}: unknown field")
    setattr(s, key, value)
  return s


def training_config(name: str, workdir: str, model, train, data=None, mesh=None, sharding_rules=None,
                    seed: int = 0) -> config_dict.ConfigDict:
  """A complete `jaxinfer train` config from its sections (defaults where None)."""
  from jaxinfer.data.dataset import data_section
  from parallel.mesh import mesh_section

  config = config_dict.ConfigDict()
  config.name = name
  config.seed = seed
  config.workdir = workdir
  config.model = model
  config.data = data if data is not None else data_section()
  config.mesh = mesh if mesh is not None else mesh_section()
  # a preset name (overridable as --config.sharding_rules=fsdp) or a tuple of (logical, mesh axes) pairs
  config.sharding_rules = "default" if sharding_rules is None else (
      sharding_rules if isinstance(sharding_rules, str) else tuple(tuple(r) for r in sharding_rules))
  config.train = train
  return config


def validate_sections(config) -> ModelConfig:
  """Field-level checks that need no devices; returns the ModelConfig. Raises ConfigError naming the field."""
  missing = [k for k in TOP_LEVEL if k not in config]
  require(not missing, missing[0] if missing else "", "missing from the config (a `jaxinfer train` config needs "
          f"{', '.join(TOP_LEVEL)}; see jaxinfer.train.config.training_config)")
  unknown = sorted(set(config.keys()) - set(TOP_LEVEL) - {"generate"})
  require(not unknown, unknown[0] if unknown else "", f"unknown top-level field; known: {', '.join(TOP_LEVEL)}")
  cfg = model_config_from(config.model)
  t = config.train
  known = set(train_section().keys())
  extra = sorted(set(t.keys()) - known)
  require(not extra, f"train.{extra[0]}" if extra else "", "unknown field")
  require(cfg.param_dtype == "float32", "model.param_dtype",
          f"training keeps float32 master weights; got {cfg.param_dtype!r} (set model.dtype for the compute dtype)")
  for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "keep_checkpoints"):
    value = getattr(t, name)
    require(isinstance(value, int) and value >= 1, f"train.{name}", f"must be a positive integer, got {value!r}")
  for name in ("warmup_steps", "eval_every", "checkpoint_every", "sample_tokens", "stop_after"):
    value = getattr(t, name)
    require(isinstance(value, int) and value >= 0, f"train.{name}", f"must be an integer >= 0, got {value!r}")
  require(t.batch_size % t.grad_accum == 0, "train.grad_accum",
          f"train.batch_size={t.batch_size} is not divisible by grad_accum={t.grad_accum}")
  require(t.seq_len <= cfg.max_position_embeddings, "train.seq_len",
          f"{t.seq_len} exceeds model.max_position_embeddings={cfg.max_position_embeddings}")
  require(t.learning_rate > 0, "train.learning_rate", f"must be > 0, got {t.learning_rate}")
  require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", f"must lie in [0, 1], got {t.min_lr_ratio}")
  require(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {t.grad_clip}")
  require(t.sequence_layout in LAYOUT_NAMES, "train.sequence_layout",
          f"{t.sequence_layout!r} is not one of {', '.join(LAYOUT_NAMES)}")
  from jaxinfer.train.remat import POLICIES
  require(t.remat in POLICIES, "train.remat", f"{t.remat!r} is not one of {', '.join(POLICIES)}")
  require(bool(config.workdir), "workdir", "must name a directory")
  return cfg
