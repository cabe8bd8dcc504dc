"""`jaxinfer run`: the driver comes from the config's `driver` field; a bad one is named before anything runs."""

import pytest

from jaxinfer.cli import main
from jaxinfer.config import ConfigError
from jaxinfer.experiments import available, driver


def test_every_experiment_config_names_an_existing_driver(config_path):
  import importlib.util
  from pathlib import Path

  for path in sorted(Path(config_path("default")).parent.glob("*.py")):
    spec = importlib.util.spec_from_file_location(f"exp_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if "driver" not in config:  # a config of another subcommand: `jaxinfer generate` / `jaxinfer serve`
      assert {"generate", "serve"} & set(config.keys()), path.name
      continue
    assert callable(driver(config.driver).run), path.name


def test_drivers_are_modules_and_helpers_are_not():
  assert {"prefix_sharing", "ring_vs_striped", "serving", "train"} <= set(available())
  assert not {"results", "timing", "sections"} & set(available())
  with pytest.raises(ConfigError, match="driver: unknown driver 'timing'"):
    driver("timing")


def test_unknown_driver_is_named(capsys, tmp_path, config_path):
  code = main(["jaxinfer", "run", "--config", config_path("serving"), "--config.driver=nope",
               f"--config.workdir={tmp_path}"])
  assert code == 2
  err = capsys.readouterr().err
  assert "driver: unknown driver 'nope'" in err and "serving" in err
  assert not list(tmp_path.iterdir())


def test_config_without_driver(capsys, config_path):
  code = main(["jaxinfer", "run", "--config", config_path("default")])
  assert code == 2 and "driver: missing" in capsys.readouterr().err


def test_relative_workdir_is_resolved_against_the_cwd(tmp_path, monkeypatch, config_path):
  monkeypatch.chdir(tmp_path)
  code = main(["jaxinfer", "run", "--config", config_path("prefix_sharing"), "--config.smoke=True",
               "--config.workdir=rel/ps", "--config.engine_decode.enabled=False", "--config.ttft.enabled=False"])
  assert code == 0
  assert (tmp_path / "rel" / "ps" / "default" / "results.md").is_file()
