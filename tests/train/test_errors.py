"""Bad input fails before anything is compiled or written, with a message naming the field."""

import os

import pytest

from jaxinfer.config import ConfigError
from jaxinfer.train import train
from jaxinfer.train import trainer


@pytest.fixture
def no_compile(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("compiled before the config was rejected")

  monkeypatch.setattr(trainer, "compile_steps", refuse)
  monkeypatch.setattr(trainer, "create_sharded_module", refuse)


def snapshot(path):
  return {p: os.stat(p).st_mtime_ns for p in sorted(path.rglob("*"))} if path.exists() else None


@pytest.mark.parametrize("mesh, train_overrides, field", [
    (dict(data=3), {}, "mesh.data: the mesh axes multiply to 3"),
    (dict(data=2, tensor=2), {}, "mesh.data: the mesh axes multiply to 4"),
    (dict(data=-1, fsdp=-1), {}, "mesh.fsdp: at most one axis may be -1"),
    (dict(data=8), dict(batch_size=6), "train.batch_size: a micro-batch of 6 rows"),
    (dict(data=8), dict(batch_size=16, grad_accum=4), "train.batch_size: a micro-batch of 4 rows"),
    (dict(data=1, tensor=8), {}, "model.num_heads: 4 heads cannot be split over the 8 devices"),
    (dict(data=1, sequence=8), dict(seq_len=40), "train.seq_len: 40 is not divisible by 16"),
    (dict(data=8), dict(grad_accum=3), "train.grad_accum"),
    (dict(data=8), dict(seq_len=1024), "train.seq_len: 1024 exceeds model.max_position_embeddings=256"),
    (dict(data=8), dict(remat="some"), "train.remat"),
])
def test_impossible_configs_fail_before_compile(tmp_path, tiny_config, no_compile, mesh, train_overrides, field):
  config = tiny_config(tmp_path / "wd", **train_overrides)
  for axis, size in mesh.items():
    setattr(config.mesh, axis, size)
  if (mesh.get("sequence", 1) > 1):
    config.train.sequence_layout = "zigzag"
  with pytest.raises(ConfigError, match=field.replace("(", r"\(").replace(")", r"\)")):
    train(config)
  assert not (tmp_path / "wd").exists()


def test_bad_sharding_rule_names_the_parameter(tmp_path, tiny_config, no_compile):
  config = tiny_config(tmp_path / "wd")
  config.mesh.data, config.mesh.fsdp = 1, 8
  config.model.hidden_size, config.model.num_heads, config.model.num_kv_heads = 36, 2, 1  # 36 % 8 != 0
  with pytest.raises(ConfigError, match=r"sharding_rules: embed_tokens.embedding dimension 1 \('embed', size 36\)"):
    train(config)
  assert not (tmp_path / "wd").exists()


def test_empty_corpus(tmp_path, tiny_config, no_compile):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  (corpus / "empty.py").write_text("\n\n")
  config = tiny_config(tmp_path / "wd")
  config.data.paths = (str(corpus),)
  with pytest.raises(ConfigError, match="data.paths: the corpus is empty"):
    train(config)
  assert not (tmp_path / "wd" / "checkpoints").exists()


def test_checkpoint_of_another_model_shape(tiny_config, reference_run, no_compile):
  workdir, _ = reference_run
  before = snapshot(workdir)
  config = tiny_config(workdir, steps=12, checkpoint_every=4, eval_every=0)
  config.model.hidden_size = 96
  config.model.intermediate_size = 256
  with pytest.raises(ConfigError, match=r"workdir: .* holds a checkpoint \(step 12\) of a different model "
                                        r"\(model.hidden_size is 64 there but 96 here, model.intermediate_size"):
    train(config)
  assert snapshot(workdir) == before  # nothing overwritten, nothing added


@pytest.mark.parametrize("override, message", [
    ("--config.mesh.data=3", "invalid config: mesh.data:"),
    ("--config.sharding_rules=zero3", "invalid config: sharding_rules: 'zero3' is neither a preset"),
    ("--config.sharding_rules=(('batch', 'data'), ('embed', 'model'))",
     "invalid config: sharding_rules[1]: 'embed' -> unknown mesh axis 'model'"),
    ("--config.train.sequence_layout=diagonal", "invalid config: train.sequence_layout"),
])
def test_cli_reports_config_errors_cleanly(tmp_path, capsys, cache_dir, no_compile, override, message):
  from jaxinfer.cli import main

  code = main(["jaxinfer", "train", "--config", "experiments/tiny.py", f"--config.workdir={tmp_path / 'wd'}",
               f"--config.data.cache_dir={cache_dir}", override])
  assert code == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "wd").exists()
