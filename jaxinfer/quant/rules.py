"""Which layers are quantized: an ordered list of module-path patterns, first match wins (as qwix's rules).

A Linear's path is its attribute path in the model joined by dots: "layers.3.self_attn.q_proj", "lm_head".
"pattern" quantizes the layers whose whole path matches the regular expression; "!pattern" keeps them in
float; a path no pattern matches stays float.
"""

from __future__ import annotations

import re

from jaxinfer.config.schema import ConfigError


def compile_rule(rule: str) -> tuple[bool, re.Pattern]:
  """(quantize?, compiled pattern)."""
  keep_float = rule.startswith("!")
  return not keep_float, re.compile(rule[1:] if keep_float else rule)


def rule_error(rule: str, error: Exception) -> ConfigError:
  return ConfigError(f"quant.rules: {rule!r} is not a valid regular expression ({error})")


def selected(path: str, rules) -> bool:
  """Whether the first rule matching `path` quantizes it (False when none matches)."""
  for rule in rules:
    quantize, pattern = compile_rule(rule)
    if pattern.fullmatch(path):
      return quantize
  return False


def path_name(path: tuple) -> str:
  return ".".join(str(p) for p in path)
