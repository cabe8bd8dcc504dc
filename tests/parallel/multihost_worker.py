"""One process of tests/parallel/test_multihost.py: `jaxinfer train` (the CLI path, arguments as given), then
greedy generate and Engine on the exported HF checkpoint over a data=2 x tensor=4 mesh (data across the two
processes, tensor within each), every process running the same deterministic scheduler in lockstep; prints
one line `INFERENCE {json}`. `infer` is also what the test runs in its single 8-device process."""

import json
import sys
from pathlib import Path

PROMPTS = [[5, 7, 9, 11, 3], [1, 2, 3], [100, 300, 4, 8, 15, 16]]
NEW = 4


def infer(checkpoint) -> dict:
  import jaxinfer
  from parallel.mesh import create_mesh

  import jax

  dcn = {"dcn_data": 2} if jax.process_count() > 1 else {}
  mesh = create_mesh({"data": 2, "tensor": 4, **dcn})
  model = jaxinfer.load_hf(checkpoint, mesh=mesh)
  engine = jaxinfer.Engine(model, max_batch_size=4, page_size=8, num_pages=16, max_model_len=32,
                           async_scheduling=False)
  return {"generate": jaxinfer.generate(model, PROMPTS, NEW),
          "engine": engine.run(PROMPTS, jaxinfer.SamplingParams(), max_new_tokens=NEW)}


if __name__ == "__main__":
  from jaxinfer.cli import main

  code = main(["jaxinfer", "train", *sys.argv[1:]])
  if code:
    sys.exit(code)
  workdir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--config.workdir="))
  print("INFERENCE " + json.dumps(infer(Path(workdir) / "hf")), flush=True)
