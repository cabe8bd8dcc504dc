"""ModelConfig: one frozen description of a decoder-only Transformer, and its Hugging Face config.json mapping."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
MOE_IMPLS = ("dense", "ragged", "pallas")
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")


from jaxinfer.config.schema import ConfigError  # noqa: F401  (re-exported: the model's errors are config errors)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  SECTION = "model"  # config section name (not a field: no annotation)
  model_type: str = "llama"
  vocab_size: int = 32000
  hidden_size: int = 512
  intermediate_size: int = 1376
  num_layers: int = 8
  num_heads: int = 8
  num_kv_heads: int = 2
  head_dim: int | None = None  # None: hidden_size // num_heads
  max_position_embeddings: int = 4096
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # bias on q, k, v and o (Llama's attention_bias)
  qkv_bias: bool = False  # bias on q, k, v only (Qwen2)
  mlp_bias: bool = False
  qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None  # per layer "full_attention" / "sliding_attention"; None: all alike
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype
  attention_impl: str | None = None  # pallas_kernels.flash_attention implementation; None = best for backend
  initializer_range: float = 0.02
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  # Mixture of Experts (jaxinfer/models/moe.py): num_experts = 0 is a dense model.
  num_experts: int = 0
  num_experts_per_tok: int = 2
  norm_topk_prob: bool = True  # renormalise the top-k probabilities to sum to 1 (Mixtral always does)
  moe_intermediate_size: int | None = None  # None: intermediate_size
  shared_expert_intermediate_size: int = 0  # > 0: a shared expert with a sigmoid gate (Qwen2-MoE)
  decoder_sparse_step: int = 1  # layer i is MoE when (i + 1) % step == 0 and i is not in mlp_only_layers
  mlp_only_layers: tuple[int, ...] = ()
  moe_impl: str = "ragged"  # "dense" (reference), "ragged" (jax.lax.ragged_dot), "pallas" (pallas_kernels)
  capacity_factor: float = 0.0  # 0: dropless; > 0: each expert keeps ceil(cf * tokens * k / E) assignments
  router_aux_loss_coef: float = 0.001  # load-balancing loss weight in training (Switch / Mixtral form)
  router_z_loss_coef: float = 0.0  # router z-loss weight in training (ST-MoE)

  def __post_init__(self):
    self.validate()

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  def layer_window(self, layer: int) -> int | None:
    """The sliding window of one layer (None: full attention)."""
    if self.sliding_window is None:
      return None
    if self.layer_types is None:
      return self.sliding_window
    return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

  @property
  def resolved_moe_intermediate_size(self) -> int:
    return self.moe_intermediate_size if self.moe_intermediate_size is not None else self.intermediate_size

  def is_moe_layer(self, layer: int) -> bool:
    """Whether decoder layer `layer` has an MoE block in place of the dense MLP (Qwen-MoE's rule)."""
    return (self.num_experts > 0 and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0)

  def validate(self) -> None:
    def need(cond: bool, field: str, msg: str):
      if not cond:
        raise ConfigError(f"model.{field}: {msg}")

    need(self.model_type in SUPPORTED_MODEL_TYPES, "model_type",
         f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "max_position_embeddings"):
      value = getattr(self, name)
      need(isinstance(value, int) and value > 0, name, f"must be a positive integer, got {value!r}")
    need(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
         f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim is None:
      need(self.hidden_size % self.num_heads == 0, "head_dim",
           f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; set head_dim")
    need(self.resolved_head_dim % 2 == 0, "head_dim", f"RoPE needs an even head_dim, got {self.resolved_head_dim}")
    need(self.rope_type in ROPE_TYPES, "rope_type", f"{self.rope_type!r} is not one of {ROPE_TYPES}")
    need(self.rope_factor > 0, "rope_factor", f"must be > 0, got {self.rope_factor}")
    need(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
    need(self.sliding_window is None or self.sliding_window > 0, "sliding_window",
         f"must be None or > 0, got {self.sliding_window}")
    if self.layer_types is not None:
      need(len(self.layer_types) == self.num_layers, "layer_types",
           f"has {len(self.layer_types)} entries for {self.num_layers} layers")
      bad = set(self.layer_types) - {"full_attention", "sliding_attention"}
      need(not bad, "layer_types", f"unknown layer types {sorted(bad)}")
    need(self.param_dtype in DTYPES, "param_dtype", f"{self.param_dtype!r} is not one of {DTYPES}")
    need(self.dtype in DTYPES, "dtype", f"{self.dtype!r} is not one of {DTYPES}")
    need(self.rms_norm_eps > 0, "rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
    self._validate_moe(need)

  def _validate_moe(self, need) -> None:
    need(isinstance(self.num_experts, int) and self.num_experts >= 0, "num_experts",
         f"must be an integer >= 0 (0: dense), got {self.num_experts!r}")
    need(self.moe_impl in MOE_IMPLS, "moe_impl", f"{self.moe_impl!r} is not one of {MOE_IMPLS}")
    need(self.capacity_factor >= 0, "capacity_factor", f"must be >= 0 (0: dropless), got {self.capacity_factor}")
    need(self.decoder_sparse_step >= 1, "decoder_sparse_step", f"must be >= 1, got {self.decoder_sparse_step}")
    need(self.shared_expert_intermediate_size >= 0, "shared_expert_intermediate_size",
         f"must be >= 0, got {self.shared_expert_intermediate_size}")
    need(self.router_aux_loss_coef >= 0, "router_aux_loss_coef", f"must be >= 0, got {self.router_aux_loss_coef}")
    need(self.router_z_loss_coef >= 0, "router_z_loss_coef", f"must be >= 0, got {self.router_z_loss_coef}")
    bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
    need(not bad, "mlp_only_layers", f"layers {bad} are outside 0..{self.num_layers - 1}")
    if self.num_experts:
      need(1 <= self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
           f"must be in 1..num_experts={self.num_experts}, got {self.num_experts_per_tok}")
      need(self.resolved_moe_intermediate_size > 0, "moe_intermediate_size",
           f"must be > 0, got {self.moe_intermediate_size}")

  def active_params_per_token(self) -> int:
    """Parameters one token's forward pass touches (the k routed experts, not all of them)."""
    return self.num_params(active=True)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self, active: bool = False) -> int:
    """All parameters (active=True: only those one token uses, i.e. num_experts_per_tok of the experts)."""
    d, hd = self.hidden_size, self.resolved_head_dim
    attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
    emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    experts = self.num_experts_per_tok if active else self.num_experts
    moe = (3 * d * self.resolved_moe_intermediate_size * experts + d * self.num_experts
           + (3 * d * self.shared_expert_intermediate_size + d if self.shared_expert_intermediate_size else 0))
    mlps = sum(moe if self.is_moe_layer(i) else 3 * d * self.intermediate_size for i in range(self.num_layers))
    return self.num_layers * (attn + 2 * d) + mlps + emb + d

  # ---------------------------------------------------------------- Hugging Face config.json
  @classmethod
  def from_hf(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ConfigError(f"config.json model_type: unsupported model_type {model_type!r}; "
                        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if hf.get("hidden_act", "silu") != "silu":
      raise ConfigError(f"config.json hidden_act: only 'silu' is supported, got {hf['hidden_act']!r}")
    # transformers >= 5 writes rope_parameters; older files have rope_theta + rope_scaling.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
      raise ConfigError(f"config.json rope type {rope_type!r} is not supported; supported: {ROPE_TYPES}")
    num_heads = hf["num_attention_heads"]
    sliding_window = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and not hf.get("use_sliding_window", False):
      sliding_window = None
    layer_types = hf.get("layer_types")
    eos = hf.get("eos_token_id")
    fields = dict(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim"),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_type=rope_type,
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)) and model_type not in ("qwen2", "qwen2_moe"),
        qkv_bias=model_type == "qwen2" or (model_type == "qwen2_moe" and bool(hf.get("qkv_bias", True))),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        sliding_window=sliding_window,
        layer_types=tuple(layer_types) if (layer_types and sliding_window is not None) else None,
        initializer_range=hf.get("initializer_range", 0.02),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
    )
    if model_type in MOE_MODEL_TYPES:
      fields.update(_moe_from_hf(hf, model_type))
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": self.rope_type}
    if self.rope_type != "default":
      rope["factor"] = self.rope_factor
    if self.rope_type == "llama3":
      rope.update(low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor,
                  original_max_position_embeddings=self.rope_original_max_position)
    hf = {
        "architectures": [_ARCHITECTURES[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.resolved_head_dim,
        "max_position_embeddings": self.max_position_embeddings,
        "rms_norm_eps": self.rms_norm_eps,
        "hidden_act": "silu",
        "rope_theta": self.rope_theta,  # read by transformers < 5
        "rope_parameters": rope,  # read by transformers >= 5
        "rope_scaling": None if self.rope_type == "default" else rope,
        "tie_word_embeddings": self.tie_word_embeddings,
        "initializer_range": self.initializer_range,
        "torch_dtype": self.param_dtype,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
    }
    if self.model_type == "llama":
      hf.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
    if self.model_type in ("mistral", "mixtral"):
      hf["sliding_window"] = self.sliding_window
    if self.model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
      hf.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                max_window_layers=self.num_layers)
      if self.layer_types is not None:
        hf["layer_types"] = list(self.layer_types)
    if self.model_type in ("qwen3", "qwen3_moe"):
      hf["attention_bias"] = self.attention_bias
    if self.model_type == "qwen2_moe":
      hf["qkv_bias"] = self.qkv_bias
    if self.model_type in MOE_MODEL_TYPES:
      hf.update(_moe_to_hf(self))
    return hf

  def check_supported_combination(self) -> None:
    """Hugging Face families cannot express every combination of our flags; refuse before writing a file."""
    self._check_moe_combination()
    if self.qkv_bias and self.model_type not in ("qwen2", "qwen2_moe"):
      raise ConfigError(f"model.qkv_bias: only Qwen2 has q/k/v-only bias, model_type is {self.model_type!r}")
    if self.qk_norm and self.model_type not in ("qwen3", "qwen3_moe"):
      raise ConfigError(f"model.qk_norm: only Qwen3 has q/k norm, model_type is {self.model_type!r}")
    if self.sliding_window is not None and self.model_type == "llama":
      raise ConfigError("model.sliding_window: Llama checkpoints cannot express a sliding window")


  def _check_moe_combination(self) -> None:
    t = self.model_type
    if self.num_experts and t not in MOE_MODEL_TYPES:
      raise ConfigError(f"model.num_experts: a {t!r} checkpoint has no experts; use one of {MOE_MODEL_TYPES}")
    if not self.num_experts and t in MOE_MODEL_TYPES:
      raise ConfigError(f"model.num_experts: a {t!r} checkpoint needs num_experts > 0")
    if t == "mixtral" and not self.norm_topk_prob:
      raise ConfigError("model.norm_topk_prob: Mixtral always renormalises the top-k probabilities")
    if t == "mixtral" and (self.decoder_sparse_step != 1 or self.mlp_only_layers):
      raise ConfigError("model.decoder_sparse_step: Mixtral has an MoE block in every layer")
    if t == "qwen2_moe" and not self.shared_expert_intermediate_size:
      raise ConfigError("model.shared_expert_intermediate_size: Qwen2-MoE always has a shared expert (> 0)")
    if t in ("mixtral", "qwen3_moe") and self.shared_expert_intermediate_size:
      raise ConfigError(f"model.shared_expert_intermediate_size: {t!r} has no shared expert; must be 0")


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                  "qwen3_moe": "Qwen3MoeForCausalLM"}


def _moe_from_hf(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
  """MoE fields of a mixtral / qwen2_moe / qwen3_moe config.json (transformers writes the expert count of
  qwen3_moe as num_local_experts, of qwen2_moe as num_experts)."""
  experts = hf.get("num_local_experts", hf.get("num_experts"))
  if experts is None:
    raise ConfigError("config.json num_local_experts: missing for an MoE model_type " + repr(model_type))
  fields = dict(num_experts=int(experts), num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)),
                router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
  if model_type == "mixtral":
    return fields | dict(norm_topk_prob=True)
  fields.update(norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                moe_intermediate_size=int(hf["moe_intermediate_size"]),
                decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)),
                mlp_only_layers=tuple(int(i) for i in hf.get("mlp_only_layers") or ()))
  if model_type == "qwen2_moe":
    fields["shared_expert_intermediate_size"] = int(hf["shared_expert_intermediate_size"])
  return fields


def _moe_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  hf = {"num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
        "router_aux_loss_coef": cfg.router_aux_loss_coef, "output_router_logits": False}
  if cfg.model_type == "mixtral":  # every layer is MoE; transformers reads the expert width from intermediate_size
    return hf | {"intermediate_size": cfg.resolved_moe_intermediate_size}
  hf.update(num_experts=cfg.num_experts, norm_topk_prob=cfg.norm_topk_prob,
            moe_intermediate_size=cfg.resolved_moe_intermediate_size, decoder_sparse_step=cfg.decoder_sparse_step,
            mlp_only_layers=list(cfg.mlp_only_layers))
  if cfg.model_type == "qwen2_moe":
    hf["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
  return hf


