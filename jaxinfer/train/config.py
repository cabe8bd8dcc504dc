"""Config sections of `jaxinfer train` and their validation (before anything is compiled or written).

An experiment's get_config() returns a ConfigDict with:
  name, seed, workdir          the run; workdir holds checkpoints, metrics.jsonl, results.md, plots, hf/
  model                        jaxinfer.config.model_section(...)   (ModelConfig)
  data                         jaxinfer.config.data_section(...)    (jaxinfer.data.DataConfig)
  mesh                         jaxinfer.config.mesh_section(...)    (parallel.mesh.MeshConfig): -1 = the rest
  sharding_rules               ((logical, mesh axes), ...) pairs, or a preset name of parallel.sharding.RULE_PRESETS
  train                        jaxinfer.config.train_section(...)   (TrainConfig below)

train.objective picks what is trained (OBJECTIVES below): "lm", the language model of the `model` section,
or "medusa", Medusa-1 heads on a frozen base (jaxinfer/train/medusa.py), whose `medusa` section replaces
`model` (the base's own config.json gives the model).
"""

from __future__ import annotations

import dataclasses
import os

from ml_collections import config_dict

from jaxinfer.config import from_section, require, to_section
from jaxinfer.data.dataset import DataConfig
from jaxinfer.models.config import ModelConfig

LAYOUT_NAMES = ("contiguous", "striped", "zigzag")
TOP_LEVEL = ("name", "seed", "workdir", "model", "data", "mesh", "sharding_rules", "train")
OPTIONAL_TOP_LEVEL = ("driver", "generate")
# train.objective -> "module:Class" of its task (the trainer's one seam; see jaxinfer.train.trainer.LMTask)
OBJECTIVES = {"lm": "jaxinfer.train.trainer:LMTask", "medusa": "jaxinfer.train.medusa:MedusaTask"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The `train` section: schedule, batch, optimizer, evaluation, checkpoints, export and samples."""
  SECTION = "train"
  steps: int = 100  # the run's length: the learning-rate schedule spans these steps
  stop_after: int = 0  # > 0: stop (with a checkpoint) after this step, e.g. to split a run over time-limited jobs
  batch_size: int = 8  # global rows per optimizer step (all devices, all accumulation steps)
  seq_len: int = 256
  grad_accum: int = 1  # micro-batches per step: each holds batch_size // grad_accum rows
  learning_rate: float = 3e-3
  warmup_steps: int = 10
  min_lr_ratio: float = 0.1  # cosine decay ends at learning_rate * min_lr_ratio
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip: float = 1.0  # global-norm clipping; 0 disables
  remat: str = "none"  # none | full | dots | dots_no_batch (jaxinfer.train.remat.POLICIES)
  sequence_layout: str = "contiguous"  # with mesh.sequence > 1: contiguous | striped | zigzag
  eval_every: int = 50  # steps; 0: only at the end
  eval_batches: int = 4  # held-out batches of batch_size rows (at most the whole held-out split)
  checkpoint_every: int = 50  # steps; the last step is always saved
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  peak_flops_per_device: float = 0.0  # 0: from the device kind (see jaxinfer.train.flops)
  progress: bool = True  # tqdm bar
  export_hf: bool = True  # workdir/hf: config.json + model.safetensors + tokenizer.json
  sample_prompts: tuple[str, ...] = ("def ", "import ", "class ")
  sample_tokens: int = 48
  sample_temperature: float = 0.7
  sample_top_k: int = 40
  objective: str = "lm"  # what is trained: a key of OBJECTIVES (lm | medusa)

  def __post_init__(self):
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "keep_checkpoints"):
      value = getattr(self, name)
      require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"train.{name}",
              f"must be a positive integer, got {value!r}")
    for name in ("warmup_steps", "eval_every", "checkpoint_every", "sample_tokens", "stop_after"):
      value = getattr(self, name)
      require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, f"train.{name}",
              f"must be an integer >= 0, got {value!r}")
    require(self.batch_size % self.grad_accum == 0, "train.grad_accum",
            f"train.batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")
    require(self.learning_rate > 0, "train.learning_rate", f"must be > 0, got {self.learning_rate}")
    require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", f"must lie in [0, 1], got {self.min_lr_ratio}")
    require(self.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {self.grad_clip}")
    require(self.sequence_layout in LAYOUT_NAMES, "train.sequence_layout",
            f"{self.sequence_layout!r} is not one of {', '.join(LAYOUT_NAMES)}")
    from jaxinfer.train.remat import POLICIES
    require(self.remat in POLICIES, "train.remat", f"{self.remat!r} is not one of {', '.join(POLICIES)}")
    require(self.objective in OBJECTIVES, "train.objective",
            f"{self.objective!r} is not one of {', '.join(OBJECTIVES)}")


def objective_task(name: str):
  """The task class of train.objective `name` (imported on demand: the table names modules, not objects)."""
  import importlib

  module, cls = OBJECTIVES[name].split(":")
  return getattr(importlib.import_module(module), cls)


def training_config(name: str, workdir: str, model, train, data=None, mesh=None, sharding_rules=None,
                    seed: int = 0, **sections) -> config_dict.ConfigDict:
  """A complete `jaxinfer train` config from its sections (defaults where None). model=None leaves the model
  section out (an objective that takes its model elsewhere, e.g. medusa=medusa_section(...) among `sections`:
  the objective's own top-level sections)."""
  from jaxinfer.config import data_section, mesh_section

  config = config_dict.ConfigDict()
  config.name = name
  config.seed = seed
  config.workdir = workdir
  if model is not None:
    config.model = model
  config.data = data if data is not None else data_section()
  config.mesh = mesh if mesh is not None else mesh_section()
  # a preset name (overridable as --config.sharding_rules=fsdp) or a tuple of (logical, mesh axes) pairs
  config.sharding_rules = "default" if sharding_rules is None else (
      sharding_rules if isinstance(sharding_rules, str) else tuple(tuple(r) for r in sharding_rules))
  config.train = train
  for key, section in sections.items():
    setattr(config, key, section)
  return config


def validate_sections(config) -> tuple[ModelConfig, TrainConfig]:
  """Field-level checks that need no devices; returns (ModelConfig, TrainConfig). Raises ConfigError naming the
  field."""
  objective = _objective_name(config)
  task = objective_task(objective)
  # an objective may bring its model in a section of its own, in place of `model`
  top_level = tuple(s for k in TOP_LEVEL for s in (task.SECTIONS if k == "model" else (k,)))
  missing = [k for k in top_level if k not in config]
  require(not missing, missing[0] if missing else "", "missing from the config (a `jaxinfer train` config needs "
          f"{', '.join(top_level)}; see jaxinfer.train.config.training_config)")
  unknown = sorted(set(config.keys()) - set(top_level) - set(OPTIONAL_TOP_LEVEL))
  require(not unknown, unknown[0] if unknown else "", f"unknown top-level field; known: {', '.join(top_level)}"
          + (f" (train.objective={objective!r} takes the model from its {task.SECTIONS[0]!r} section)"
             if "model" not in top_level and "model" in unknown else ""))
  cfg = task.model_config(config)
  t = from_section(TrainConfig, config.train, "train")
  from_section(DataConfig, config.data, "data")
  require(cfg.param_dtype == "float32", "model.param_dtype",
          f"training keeps float32 master weights; got {cfg.param_dtype!r} (set model.dtype for the compute dtype)")
  require(t.seq_len <= cfg.max_position_embeddings, "train.seq_len",
          f"{t.seq_len} exceeds model.max_position_embeddings={cfg.max_position_embeddings}")
  require(bool(config.workdir), "workdir", "must name a directory")
  require(os.path.isabs(config.workdir), "workdir", f"must be absolute by now, got {config.workdir!r} (configs "
          "are resolved by jaxinfer.config.resolve_config_paths when loaded)")
  return cfg, t


def _objective_name(config) -> str:
  """train.objective as written (before the train section is validated), so the required sections are known."""
  train = config.get("train") if hasattr(config, "get") else None
  name = train.get("objective", "lm") if hasattr(train, "get") else "lm"
  require(name in OBJECTIVES, "train.objective", f"{name!r} is not one of {', '.join(OBJECTIVES)}")
  return name
