"""`jaxinfer serve`: an OpenAI-compatible server (docs/serving.md).

  jaxinfer serve --config experiments/serve.py                                   # quickstart export or random
  jaxinfer serve --config experiments/serve.py --config.serve.checkpoint=/tmp/qs/hf --config.serve.port=8001
  jaxinfer serve --config experiments/serve.py --config.engine.chunked_prefill=False
"""

from ml_collections import config_dict

from jaxinfer.config import engine_section, mesh_section, to_section
from jaxinfer.serve.config import ServeConfig


def get_config() -> config_dict.ConfigDict:
  config = config_dict.ConfigDict()
  config.name = "serve"
  config.seed = 0  # the random model's seed (when there is no checkpoint)
  config.serve = to_section(ServeConfig)
  config.engine = engine_section(max_batch_size=32, max_step_tokens=256, page_size=16)
  config.mesh = mesh_section(data=1)  # one device; --config.mesh.tensor=4: Megatron tensor parallel (docs/sharded_inference.md)
  return config
