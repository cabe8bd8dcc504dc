"""The embedded default: a small randomly initialised Llama-family model, generation on CPU, no download.

  jaxinfer generate --config experiments/default.py --config.generate.prompt="def main():"
  jaxinfer generate --config experiments/default.py --config.engine.page_size=32
"""

from ml_collections import config_dict

from jaxinfer.config import engine_section, mesh_section, generate_section, model_section


def get_config() -> config_dict.ConfigDict:
  config = config_dict.ConfigDict()
  config.name = "default"
  config.seed = 0
  config.workdir = "results/default"
  config.model = model_section(vocab_size=512, hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4,
                               num_kv_heads=2, max_position_embeddings=1024)
  config.generate = generate_section()  # jaxinfer.generation.config.GenerateConfig
  config.engine = engine_section()  # jaxinfer.engine.config.EngineConfig
  config.mesh = mesh_section(data=1)  # one device; --config.mesh.tensor=4: Megatron tensor parallel (docs/sharded_inference.md)
  return config
