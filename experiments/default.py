"""The embedded default: a small randomly initialised Llama-family model, generation on CPU, no download.

  jaxinfer generate --config experiments/default.py --config.generate.prompt="def main():"
"""

from ml_collections import config_dict

from jaxinfer.configs import model_section


def get_config() -> config_dict.ConfigDict:
  config = config_dict.ConfigDict()
  config.name = "default"
  config.seed = 0
  config.workdir = "results/default"
  config.model = model_section(vocab_size=512, hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4,
                               num_kv_heads=2, max_position_embeddings=1024)
  config.generate = generate_section()
  return config


def generate_section() -> config_dict.ConfigDict:
  section = config_dict.ConfigDict()
  section.checkpoint = ""  # a Hugging Face directory; empty: a model built from config.model with config.seed
  section.prompt = "def fibonacci(n):"
  section.prompts = ()  # several prompts at once; overrides `prompt` when non-empty
  section.max_new_tokens = 64
  section.temperature = 0.0
  section.top_k = 0
  section.top_p = 1.0
  section.min_p = 0.0
  section.sample_seed = 0
  section.stop_at_eos = True
  return section
