"""The `jaxinfer` command: `jaxinfer <subcommand> --config experiments/<name>.py [--config.<field>=<value> ...]`.

Subcommands live in jaxinfer/commands/, one module each with `run(config)`; this file only parses flags and
makes the config's paths absolute (jaxinfer.config.resolve_config_paths) before handing it over.
`jaxinfer run` runs any experiment by its `driver` field; `train` and `generate` run those commands directly.
"""

from __future__ import annotations

import importlib
import logging
import sys

SUBCOMMANDS = {
    "bench": "jaxinfer.commands.bench",
    "generate": "jaxinfer.commands.generate",
    "run": "jaxinfer.commands.run",
    "serve": "jaxinfer.commands.serve",
    "train": "jaxinfer.commands.train",
}


def _usage() -> str:
  return ("usage: jaxinfer {" + ",".join(SUBCOMMANDS) + "} --config experiments/<name>.py "
          "[--config.<field>=<value> ...]")


def _describe_flag_error(error: Exception, argv: list[str]) -> str:
  # config_flags reports an unknown override only as the missing key, e.g. "'foo'": name the whole field
  key = str(error).strip("\"' ")
  for arg in argv:
    field = arg.split("=", 1)[0].removeprefix("--")
    if field.startswith("config.") and field.split(".")[-1] == key:
      return f"unknown config field {field!r}"
  return f"bad flag: {error}"


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in SUBCOMMANDS:
    print(_usage(), file=sys.stderr)
    return 2
  command = argv.pop(1)
  from absl import flags
  from ml_collections import config_flags

  from jaxinfer.config import ConfigError, resolve_config_paths

  flag_values = flags.FlagValues()
  config_flag = config_flags.DEFINE_config_file("config", None, "experiment config file", flag_values=flag_values,
                                                lock_config=True, sys_argv=argv)
  flags.DEFINE_string("log_level", "INFO", "logging level", flag_values=flag_values)
  try:
    flag_values(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    print(f"jaxinfer {command}: {_describe_flag_error(e, argv)}", file=sys.stderr)
    return 2
  if config_flag.value is None:
    print(f"jaxinfer {command}: --config is required\n{_usage()}", file=sys.stderr)
    return 2
  logging.basicConfig(level=flag_values.log_level, format="%(asctime)s %(name)s: %(message)s", force=True)
  module = importlib.import_module(SUBCOMMANDS[command])
  try:
    resolve_config_paths(config_flag.value)
    module.run(config_flag.value)
  except ConfigError as e:
    print(f"jaxinfer {command}: invalid config: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
