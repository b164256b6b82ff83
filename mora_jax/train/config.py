"""Run configs as data: `ml_collections.ConfigDict` files with a `get_config()` (big_vision's convention),
command-line overrides `--config.a.b=value`, and errors that name the offending file or key."""

import ast
import difflib
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from mora_jax.adapters import registry


class ConfigError(ValueError):
  """A config file or override that cannot be used; the message says which and how to fix it."""


def load(path: str | Path) -> ml_collections.ConfigDict:
  """Runs `get_config()` of a config file; the result is locked (no new keys) so a typo cannot go unnoticed."""
  path = Path(path)
  if not path.is_file():
    raise ConfigError(f"config file {path} does not exist; the shipped configs are in configs/ "
                      f"(e.g. configs/easy_vqa_mora.py).")
  spec = importlib.util.spec_from_file_location(f"mora_jax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} has no get_config() function.")
  config = module.get_config()
  config.lock()
  return config


def _parse(text: str):
  """A Python literal (numbers, tuples, True/None, quoted strings), otherwise the text itself as a string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _unknown(config: ml_collections.ConfigDict, key: str, prefix: str) -> ConfigError:
  close = difflib.get_close_matches(key, list(config.keys()), n=1)
  hint = f" Did you mean {prefix}{close[0]}?" if close else ""
  return ConfigError(f"unknown config key '{prefix}{key}'.{hint} Keys here: "
                     f"{', '.join(prefix + k for k in sorted(config.keys()))}.")


def override(config: ml_collections.ConfigDict, dotted_key: str, text: str) -> None:
  """Sets `config.<dotted_key>` from its command-line text, keeping the field's type (an int given for a
  float field is converted; a string for a number is an error naming the key)."""
  *parents, leaf = dotted_key.split(".")
  node, prefix = config, ""
  for part in parents:
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise _unknown(node, part, prefix)
    node, prefix = node[part], f"{prefix}{part}."
  if leaf not in node:
    raise _unknown(node, leaf, prefix)
  value = _parse(text)
  current = node[leaf]
  if isinstance(current, tuple) and isinstance(value, (str, list)):
    value = tuple(value) if isinstance(value, list) else tuple(v for v in value.split(",") if v)
  if isinstance(current, str) and not isinstance(value, str):
    value = text
  try:
    node[leaf] = value
  except TypeError as e:
    raise ConfigError(f"config key {prefix}{leaf}: {text!r} does not fit its type "
                      f"{type(current).__name__} (current value {current!r}).") from e


ADAPTER_METHOD = "adapter.method"


def switch_adapter(config: ml_collections.ConfigDict, method: str, log=print) -> None:
  """`config.adapter` rebuilt for another method (its fields differ): the fields every method shares are kept,
  the old method's own ones are dropped with a note, the new method's take their defaults."""
  old = config.adapter.method
  if method == old:
    return
  try:
    values, dropped = registry.switch(config.adapter.to_dict(), method)
  except ValueError as e:
    raise ConfigError(f"config key {ADAPTER_METHOD}: {e}") from e
  with config.unlocked():
    config.adapter = ml_collections.ConfigDict(values)
  if dropped:
    log(f"note: adapter.method={method} replaces {old}: dropped the adapter options {', '.join(dropped)}; "
        "options of the new method take its defaults unless set with --config.adapter.KEY=VALUE.")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]], log=print) -> None:
  """Applies `--config.KEY=VALUE` overrides; adapter.method first, so that options of the new method given in
  any order are kept."""
  for key, text in sorted(overrides, key=lambda kv: kv[0] != ADAPTER_METHOD):
    if key == ADAPTER_METHOD:
      switch_adapter(config, text, log)
    else:
      override(config, key, text)


def check_minimums(config: ml_collections.ConfigDict, minimums: dict[str, int]) -> None:
  """Refuses a value below its smallest meaningful one (dotted key -> minimum), naming the key: a zero batch or a
  negative step count would otherwise fail only inside the run, as an IndexError or a division by zero."""
  for key, minimum in minimums.items():
    value = config
    for part in key.split("."):
      value = value[part]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise ConfigError(f"config.{key}={value!r}: must be an integer >= {minimum}.")


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def from_json(text: str) -> ml_collections.ConfigDict:
  """The inverse of `to_json` (JSON lists become tuples, as config fields hold tuples)."""

  def tuples(value):
    if isinstance(value, dict):
      return {k: tuples(v) for k, v in value.items()}
    return tuple(tuples(v) for v in value) if isinstance(value, list) else value

  config = ml_collections.ConfigDict(tuples(json.loads(text)))
  config.lock()
  return config


def fill_absent(saved: dict, defaults: dict, skip=()) -> dict:
  """`saved` with every key of `defaults` it lacks added, recursively (sections named in `skip` kept as saved)."""
  out = dict(saved)
  for key, value in defaults.items():
    if key not in out:
      out[key] = value
    elif isinstance(value, dict) and isinstance(out[key], dict) and key not in skip:
      out[key] = fill_absent(out[key], value)
  return out


def differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
  """'key: saved -> current' for every leaf that differs between two config dicts."""
  lines = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      lines += differences(a, b, f"{prefix}{key}.")
    elif a != b:
      lines.append(f"{prefix}{key}: {a!r} -> {b!r}")
  return lines
