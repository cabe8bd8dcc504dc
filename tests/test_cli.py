"""The `jaxinfer` command: config files, --config.<field> overrides, validation before any compile."""

import pytest

from jaxinfer.cli import main


def run(capsys, *args):
  code = main(["jaxinfer", *args])
  out = capsys.readouterr()
  return code, out.out, out.err


def test_generate_from_config(capsys):
  code, out, _ = run(capsys, "generate", "--config", "experiments/default.py",
                     "--config.generate.max_new_tokens=6", "--config.model.num_layers=2",
                     "--config.generate.prompt=def f(x):")
  assert code == 0
  assert "=== prompt: 'def f(x):'" in out


@pytest.mark.parametrize("override, message", [
    ("--config.model.not_a_field=3", "unknown config field 'config.model.not_a_field'"),
    ("--config.model.num_kv_heads=3", "model.num_kv_heads: num_heads=4 is not a multiple of num_kv_heads=3"),
    ("--config.model.model_type=gpt2", "unsupported model_type 'gpt2'"),
    ("--config.generate.max_new_tokens=0", "generate.max_new_tokens"),
    ("--config.generate.top_p=1.5", "generate.top_p"),
    ("--config.model.num_layers=abc", "num_layers"),
])
def test_bad_config_fails_before_compile_naming_the_field(capsys, override, message):
  from jaxinfer.generation import compilation_count

  before = compilation_count()
  code, _, err = run(capsys, "generate", "--config", "experiments/default.py", override)
  assert code == 2
  assert message in err
  assert compilation_count() == before


def test_usage_errors(capsys):
  assert run(capsys, "nonsense")[0] == 2
  code, _, err = run(capsys, "generate")
  assert code == 2 and "--config is required" in err
