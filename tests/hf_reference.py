"""Small randomly initialised Hugging Face models (one per family and option) saved with save_pretrained."""

from __future__ import annotations

import numpy as np
import torch
import transformers

BASE = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=None,
            eos_token_id=None, pad_token_id=None)

# name -> (config class, overrides): every family and option the issue lists
FAMILIES = {
    "llama-default-gqa": (transformers.LlamaConfig, {}),
    "llama3-rope-tied-bias": (transformers.LlamaConfig, dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}, tie_word_embeddings=True, attention_bias=True)),
    "llama-linear-rope-mqa": (transformers.LlamaConfig, dict(
        rope_scaling={"rope_type": "linear", "factor": 4.0}, num_key_value_heads=1, rope_theta=500000.0)),
    "mistral-window": (transformers.MistralConfig, dict(sliding_window=7, head_dim=16)),
    "qwen2-bias-tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3-qknorm-headdim": (transformers.Qwen3Config, dict(head_dim=24, num_attention_heads=4,
                                                           num_key_value_heads=2)),
}

# Mixture-of-Experts families (tests/models/test_moe_hf_parity.py): 3 and 6 experts are not powers of two;
# Qwen2-MoE with its shared expert, norm_topk_prob off, MoE only in layer 1 (decoder_sparse_step=2);
# Qwen3-MoE with norm_topk_prob on and layer 0 dense (mlp_only_layers).
MOE_FAMILIES = {
    "mixtral-e3-window": (transformers.MixtralConfig, dict(num_local_experts=3, num_experts_per_tok=2,
                                                          sliding_window=7)),
    "qwen2moe-shared-step2": (transformers.Qwen2MoeConfig, dict(
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, decoder_sparse_step=2)),
    "qwen3moe-norm-mlponly": (transformers.Qwen3MoeConfig, dict(
        num_experts=6, num_experts_per_tok=3, norm_topk_prob=True, moe_intermediate_size=40, mlp_only_layers=[0],
        head_dim=24)),
}


def make_hf_model(name: str, seed: int = 0):
  config_cls, overrides = FAMILIES[name] if name in FAMILIES else MOE_FAMILIES[name]
  config = config_cls(**{**BASE, **overrides})
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
  # Random everything (biases and norm weights included) so that every tensor is exercised, with a scale
  # large enough that greedy argmaxes are well separated.
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if pname.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.15)
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  return model


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def hf_greedy(model, prompt, max_new_tokens):
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
  return out[0, len(prompt):].tolist()


def rel_err(a, b) -> float:
  """max |a - b| / max |b|: the parity tests' relative error."""
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


def saved_family(name: str, tmp_path_factory):
  """(name, the transformers model, its save_pretrained folder, jaxinfer.load_hf of that folder)."""
  import jaxinfer

  hf = make_hf_model(name)
  path = tmp_path_factory.mktemp(name)
  hf.save_pretrained(path)
  return name, hf, path, jaxinfer.load_hf(path)
