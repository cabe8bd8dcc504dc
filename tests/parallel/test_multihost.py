"""Multi-host path on one machine: two processes (4 CPU devices each, localhost coordinator) run the tiny
experiment through `jaxinfer train`, with a DCN-split mesh across the processes, then (in the same launch, so one
start-up serves both) greedy generate and Engine on the exported HF checkpoint sharded over data=2 (across the
processes) x tensor=4, and agree with one process holding all 8 devices."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from parallel.distributed import detect_cluster, initialize_from_env

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "multihost_worker.py"
OVERRIDES = ["--config.train.steps=2", "--config.train.checkpoint_every=2", "--config.train.eval_every=0",
             "--config.train.sample_prompts=()", "--config.train.progress=False", "--config.mesh.data=2",
             "--config.mesh.fsdp=4"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in map(json.loads, (Path(workdir) / "metrics.jsonl").read_text().splitlines())}


def test_cluster_detection_from_the_environment():
  assert detect_cluster({}) == "single"
  assert detect_cluster({"JAXINFER_COORDINATOR": "h:1", "JAXINFER_NUM_PROCESSES": "2",
                         "JAXINFER_PROCESS_ID": "0"}) == "env"
  assert detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == "slurm"
  assert detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) == "single"
  assert detect_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
  assert initialize_from_env(env={}).source == "single"  # no-op in a single process
  with pytest.raises(ValueError, match="JAXINFER_PROCESS_ID"):
    initialize_from_env(env={"JAXINFER_COORDINATOR": "localhost:1", "JAXINFER_NUM_PROCESSES": "2"})


def test_two_processes_train_like_one(tmp_path):
  cache = tmp_path / "cache"
  workdir = tmp_path / "two"
  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="highest", JAXINFER_COORDINATOR=f"localhost:{port}",
               JAXINFER_NUM_PROCESSES="2", JAXINFER_PROCESS_ID=str(pid),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    args = [sys.executable, str(WORKER), "--config", "experiments/tiny.py",
            f"--config.workdir={workdir}", f"--config.data.cache_dir={cache}", "--config.mesh.dcn_data=2",
            *OVERRIDES]
    procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
  outputs = []
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=400)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  inferred = [json.loads(next(line for line in out.splitlines() if line.startswith("INFERENCE "))[10:])
              for out in outputs]
  assert inferred[0] == inferred[1]  # both processes saw the same tokens
  two = _losses(workdir)
  assert sorted(two) == [1, 2]  # written once, by process 0
  assert (workdir / "checkpoints" / "2").is_dir()
  assert (workdir / "hf" / "model.safetensors").is_file()  # gathered from both processes' shards

  # the same job in this one process, over its 8 devices
  spec = importlib.util.spec_from_file_location("tiny_experiment", REPO / "experiments" / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.workdir = str(tmp_path / "one")
  config.data.cache_dir = str(cache)
  config.train.steps, config.train.checkpoint_every, config.train.eval_every = 2, 2, 0
  config.train.sample_prompts, config.train.progress, config.train.export_hf = (), False, False
  config.mesh.data, config.mesh.fsdp = 2, 4
  from jaxinfer.train import train

  one = train(config).losses
  for step in (1, 2):
    assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step

  # inference on the two processes' export, in this one process over its 8 devices: the same tokens
  worker_spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
  worker = importlib.util.module_from_spec(worker_spec)
  worker_spec.loader.exec_module(worker)
  assert worker.infer(workdir / "hf") == inferred[0]
