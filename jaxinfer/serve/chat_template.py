"""Chat templates: found in a checkpoint and rendered the way transformers' `apply_chat_template` renders them
(a sandboxed jinja2 environment with trim_blocks and lstrip_blocks, loop controls, `raise_exception`,
`strftime_now`, a `tojson` filter that keeps non-ASCII text, the `{% generation %}` tag, and the tokenizer's
special-token strings as variables)."""

from __future__ import annotations

import datetime
import functools
import json
from pathlib import Path

# jaxinfer's own template, for models trained here (the quickstart export) and the random model
SIMPLE_TEMPLATE = ("{% for message in messages %}### {{ message['role'] | capitalize }}:\n{{ message['content'] }}\n\n"
                   "{% endfor %}{% if add_generation_prompt %}### Assistant:\n{% endif %}")

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class TemplateError(ValueError):
  """The template could not be rendered (its own raise_exception included); the message says why."""


def _read_json(path: Path) -> dict:
  try:
    return json.loads(path.read_text()) if path.is_file() else {}
  except (OSError, json.JSONDecodeError):
    return {}


def from_checkpoint(path: Path) -> tuple[str | None, str]:
  """(template, where it came from): chat_template.jinja first (as transformers saves it now), then the
  `chat_template` of tokenizer_config.json (a string, or a list of named templates: "default" or the first)."""
  jinja = path / "chat_template.jinja"
  if jinja.is_file():
    return jinja.read_text(), str(jinja)
  template = _read_json(path / "tokenizer_config.json").get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default") or next(iter(named.values()), None)
  if isinstance(template, str) and template:
    return template, str(path / "tokenizer_config.json")
  return None, "none"


def special_tokens(path: Path) -> dict[str, str]:
  """bos_token, eos_token, ... of tokenizer_config.json as strings (they may be stored as {"content": ...})."""
  config = _read_json(path / "tokenizer_config.json")
  out = {}
  for key in SPECIAL_TOKEN_KEYS:
    value = config.get(key)
    if isinstance(value, dict):
      value = value.get("content")
    if isinstance(value, str):
      out[key] = value
  return out


def _raise(message):
  raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
  import jinja2
  from jinja2 import nodes
  from jinja2.ext import Extension
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class Generation(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks: rendered as its body."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return nodes.Scope(body, lineno=lineno)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(template)
  except jinja2.TemplateSyntaxError as e:
    raise TemplateError(f"chat template: syntax error at line {e.lineno}: {e.message}") from None


def render(template: str, messages: list[dict], add_generation_prompt: bool = True, special: dict | None = None,
           **extra) -> str:
  """The prompt text for `messages` (dicts with role and content), as apply_chat_template(tokenize=False)."""
  import jinja2

  try:
    return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **(special or {}), **extra)
  except TemplateError:
    raise
  except jinja2.TemplateError as e:
    raise TemplateError(f"chat template: {e}") from None
