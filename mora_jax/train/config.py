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
from mora_jax.train import recipes, tasks


class ConfigError(ValueError):
  """A config file or override that cannot be used; the message says which and how to fix it."""


def load(path: str | Path) -> ml_collections.ConfigDict:
  """Runs `get_config()` of a config file; the result is locked (no new keys) so a typo cannot go unnoticed. Every
  way the file can be wrong (its own errors included) is a ConfigError naming it."""
  path = Path(path)
  if path.is_dir():
    raise ConfigError(f"config file {path} is a folder; give one .py config file (e.g. configs/easy_vqa_mora.py).")
  if not path.is_file():
    raise ConfigError(f"config file {path} does not exist; the shipped configs are in configs/ "
                      f"(e.g. configs/easy_vqa_mora.py).")
  if path.suffix != ".py":
    raise ConfigError(f"config file {path} is not a .py file: a config is Python with a get_config() that returns an "
                      "ml_collections.ConfigDict (e.g. configs/easy_vqa_mora.py).")
  spec = importlib.util.spec_from_file_location(f"mora_jax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-exception-caught  (the file's own error: the user's to fix)
    raise _failed(path, e) from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} has no get_config() function.")
  try:
    config = module.get_config()
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise _failed(path, e) from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"config file {path}: get_config() returned {type(config).__name__}, not an "
                      "ml_collections.ConfigDict; start from a recipe (mora_jax.train.recipes), as configs/*.py do.")
  _check_complete(config, path)
  config.lock()
  return config


def _failed(path: Path, error: Exception) -> ConfigError:
  return ConfigError(f"config file {path}: {type(error).__name__}: {error}")


def _check_complete(config: ml_collections.ConfigDict, path: Path) -> None:
  """Refuses a config without a key of its family's recipe (deleted in the file), which the run would otherwise
  meet only where it reads it, as a bare KeyError. The adapter section's fields differ per method, and
  registry.from_config gives an absent one its default."""
  mllm = tasks.is_mllm(config)
  absent = absent_keys(config.to_dict(), (recipes.mllm("moka") if mllm else recipes.base()).to_dict(),
                       skip=("adapter",))
  if absent:
    raise ConfigError(f"config file {path} lacks the key(s) {', '.join(absent)}, which the library reads: start "
                      f"from the recipe (mora_jax.train.recipes.{'mllm' if mllm else 'get'}(...), as configs/*.py "
                      "do) and change values instead of deleting keys.")


def absent_keys(config: dict, defaults: dict, skip=(), prefix: str = "") -> list[str]:
  """The dotted keys of `defaults` that `config` lacks, recursively (sections named in `skip` not looked into)."""
  absent = []
  for key, value in defaults.items():
    if key not in config:
      absent.append(f"{prefix}{key}")
    elif isinstance(value, dict) and isinstance(config[key], dict) and key not in skip:
      absent += absent_keys(config[key], value, prefix=f"{prefix}{key}.")
  return absent


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


def locate(config: ml_collections.ConfigDict, dotted_key: str) -> tuple[ml_collections.ConfigDict, str, str]:
  """(the section holding a value key, the section's dotted prefix, the key's last part), or the error that names
  the key: unknown (with the closest key), a value used as a section, or a section given a value."""
  *parents, leaf = dotted_key.split(".")
  node, prefix = config, ""
  for part in parents:
    if part not in node:
      raise _unknown(node, part, prefix)
    if not isinstance(node[part], ml_collections.ConfigDict):
      raise ConfigError(f"config key {prefix}{part} is a value, not a section: it holds no key "
                        f"{dotted_key[len(prefix + part) + 1:]!r}; set {prefix}{part}=VALUE.")
    node, prefix = node[part], f"{prefix}{part}."
  if leaf not in node:
    raise _unknown(node, leaf, prefix)
  if isinstance(node[leaf], ml_collections.ConfigDict):
    raise ConfigError(f"config key {prefix}{leaf} is a section; set {prefix}{leaf}.KEY (one of "
                      f"{', '.join(sorted(node[leaf].keys()))}).")
  return node, prefix, leaf


def override(config: ml_collections.ConfigDict, dotted_key: str, text: str) -> None:
  """Sets `config.<dotted_key>` from its command-line text, keeping the field's type (an int given for a
  float field is converted; a string for a number is an error naming the key)."""
  node, prefix, leaf = locate(config, dotted_key)
  value = _parse(text)
  current = node[leaf]
  if isinstance(current, tuple) and isinstance(value, (str, list, tuple)):
    items = value.split(",") if isinstance(value, str) else value
    value = _items(f"{prefix}{leaf}", current, [item for item in items if item != ""])
  if isinstance(current, str) and not isinstance(value, str):
    value = text
  try:
    node[leaf] = value
  except TypeError as e:
    raise ConfigError(f"config key {prefix}{leaf}: {text!r} does not fit its type "
                      f"{type(current).__name__} (current value {current!r}).") from e


def _items(key: str, current: tuple, items) -> tuple:
  """A tuple override's items as the type of the key's current items (as given when it has none): text items
  parsed as literals, ints for a float tuple converted; an item that does not fit is an error naming the key."""
  if not current:
    return tuple(items)
  kind = type(current[0])

  def convert(item):
    value = str(item) if kind is str else _parse(item) if isinstance(item, str) else item
    if kind is float and type(value) is int:  # pylint: disable=unidiomatic-typecheck  (a bool is no number here)
      value = float(value)
    if type(value) is not kind:  # pylint: disable=unidiomatic-typecheck
      raise ConfigError(f"config key {key}: item {item!r} is not a {kind.__name__}, as the key's items are (current "
                        f"value {current!r}).")
    return value

  return tuple(convert(item) for item in items)


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
