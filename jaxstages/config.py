"""Config loading and validation shared by every part of jaxstages.

Configs are data (ml_collections `ConfigDict`s written in `configs/*.py`, each file with a `get_config(arg)`).
Code turns a config into a typed, frozen dataclass with `from_config`, which rejects unknown keys with the
nearest valid names, so a typo never silently falls back to a default, and values whose type does not match a
field's annotation (`steps="ten"`), so a wrong type fails where it is written rather than deep inside training.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import functools
import hashlib
import importlib.util
import json
import numbers
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import ml_collections

# the shipped configs: inside the package where an install put them (setup.py), else the source tree's
CONFIGS_DIR = next((d for d in (Path(__file__).resolve().parent / "configs",
                                Path(__file__).resolve().parent.parent / "configs") if d.is_dir()),
                   Path(__file__).resolve().parent.parent / "configs")

T = TypeVar("T")


class ConfigError(ValueError):
  """A config that cannot be used as written; the message says which key and what would be valid."""


def check_keys(given: Iterable[str], allowed: Iterable[str], where: str) -> None:
  """Raises `ConfigError` naming every key of `given` not in `allowed`, with the closest valid names."""
  allowed = sorted(allowed)
  unknown = [k for k in given if k not in allowed]
  if not unknown:
    return
  lines = []
  for key in unknown:
    close = difflib.get_close_matches(key, allowed, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else "no close match"
    lines.append(f"unknown key {key!r} in {where} ({hint})")
  raise ConfigError("; ".join(lines) + f". Valid keys: {', '.join(allowed)}")


def to_dict(config: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
  if isinstance(config, ml_collections.ConfigDict):
    return config.to_dict()
  return dict(config)


_SCALARS = (int, float, str, bool, type(None))


@functools.cache
def _scalar_fields(cls: type) -> dict[str, tuple[type, ...]]:
  """field name -> the types its annotation allows, for fields annotated only with int/float/str/bool/None (e.g.
  `int`, `float | None`); richer annotations (tuples, `Any`) are left to the class's own checks."""
  try:
    hints = typing.get_type_hints(cls)
  except (NameError, TypeError):  # an annotation that cannot be resolved at run time: check nothing rather than fail
    return {}
  out = {}
  for field in dataclasses.fields(cls):
    hint = hints.get(field.name)
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    allowed = typing.get_args(hint) if union else (hint,)
    if all(t in _SCALARS for t in allowed):
      out[field.name] = allowed
  return out


def _fits(value: Any, allowed: tuple[type, ...]) -> bool:
  # bools are ints to Python, but `steps=True` is a mistake; ints are fine where a float belongs (`lr=1`)
  if isinstance(value, bool):
    return bool in allowed
  return ((value is None and type(None) in allowed) or (isinstance(value, str) and str in allowed)
          or (isinstance(value, numbers.Integral) and (int in allowed or float in allowed))
          or (isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and float in allowed))


def check_types(cls: type, values: Mapping[str, Any], where: str) -> None:
  """Raises `ConfigError` naming the key, the expected type and the value of the first entry of `values` that does
  not fit its field's annotation in the dataclass `cls`."""
  fields = _scalar_fields(cls)
  for key, value in values.items():
    allowed = fields.get(key)
    if allowed is not None and not _fits(value, allowed):
      expected = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
      raise ConfigError(f"{key}={value!r} in {where}: expected {expected}, got {type(value).__name__}")


def from_config(cls: type[T], config: Mapping[str, Any] | ml_collections.ConfigDict | None = None,
                where: str | None = None, **overrides: Any) -> T:
  """Builds the dataclass `cls` from a config mapping, rejecting unknown keys and values of the wrong type."""
  values = to_dict(config or {})
  values.update(overrides)
  names = [f.name for f in dataclasses.fields(cls)]
  check_keys(values.keys(), names, where or cls.__name__)
  check_types(cls, values, where or cls.__name__)
  return cls(**values)


_BOUNDS = {">=1": lambda v: v >= 1, ">0": lambda v: v > 0, ">=0": lambda v: v >= 0,
           "in [0, 1]": lambda v: 0 <= v <= 1, "in [0, 1)": lambda v: 0 <= v < 1}


def check_bounds(obj: Any, where: str, **bounds: str) -> None:
  """Raises `ConfigError` naming the key, its value and the bound for the first field of `obj` (a dataclass) outside
  its bound: `check_bounds(cfg, "stage config", steps=">=1", lr=">0")`; None values are not checked (they mean a
  default)."""
  for key, bound in bounds.items():
    value = getattr(obj, key)
    if value is not None and not isinstance(value, bool) and not _BOUNDS[bound](value):
      raise ConfigError(f"{key}={value!r} in {where}: must be {bound}")


# keys added after runs were named by their hash: at these values they are left out of the hash, so the committed
# runs and models made before the key existed keep their names
HASH_NEUTRAL = {"solution_format": "expanded", "recall_drills": 0.0,
                # model fields every preset spells out since they became overridable from the command line
                # (configs/train.py), the accelerator options added with them, and Adam's moment dtype
                "dtype": "float32", "param_dtype": "float32", "remat": False, "init_std": 0.02, "head_dim": None,
                "rope_scaling": None, "attention": "auto", "attention_block": 512, "logits_chunk": 0,
                "scan_layers": False, "remat_policy": "full", "mu_dtype": None}


def _without_neutral(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _without_neutral(v) for k, v in tree.items()
            if not (k in HASH_NEUTRAL and v == HASH_NEUTRAL[k])}
  if isinstance(tree, (list, tuple)):
    return [_without_neutral(v) for v in tree]
  return tree


def config_hash(config: Mapping[str, Any] | ml_collections.ConfigDict) -> str:
  """sha256 of the config's canonical JSON (sorted keys, `HASH_NEUTRAL` keys at their old values left out), first 12
  hex digits: names a run or a saved model by what made it."""
  return hashlib.sha256(json.dumps(_without_neutral(to_dict(config)), sort_keys=True,
                                   default=str).encode()).hexdigest()[:12]


_LOADING: list[Path] = []  # the folders of the config files being loaded, innermost last


def config_dirs() -> list[Path]:
  """Where a config spec that is not a path from the working folder is looked for, in order: the folder of the
  config file that asks (`train.py` loading `models.py:toy` reads its own sibling; a file in a subfolder such as
  `recipes/`, also the folder above), the working folder's `configs/`
  (the checkout the user runs in), then the copy beside the package (`CONFIGS_DIR`), only as a fallback."""
  asking = _LOADING[-1] if _LOADING else None  # configs/recipes/rl.py reads train.py from configs/
  dirs = ([asking] + ([asking.parent] if asking.name != "configs" else []) if asking else [])
  dirs += [Path.cwd() / "configs", CONFIGS_DIR]
  return list(dict.fromkeys(d.resolve() for d in dirs))


def find_config(path_str: str) -> Path:
  """The config file `path_str` names (`configs/train.py`, `train.py`, `pipelines/quickstart.py`, a path)."""
  path = Path(path_str)
  if path.is_file():
    return path
  for folder in config_dirs():
    for candidate in (folder / path_str, folder / path_str.removeprefix("configs/")):
      if candidate.is_file():
        return candidate
  raise ConfigError(f"config file {path_str!r} not found (looked as given and under "
                    f"{', '.join(str(d) for d in config_dirs())})")


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/file.py[:arg]` and returns its `get_config(arg)`.

  A path is tried as given, then under `config_dirs()`: so `load_config("models.py:toy")` and
  `load_config("configs/models.py:toy")` are the same config, read from the checkout the command runs in (a config
  file's own siblings first), the package's copy only where the checkout has none.
  """
  path_str, _, arg = spec.partition(":")
  path = find_config(path_str).resolve()
  module_spec = importlib.util.spec_from_file_location(f"jaxstages_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  _LOADING.append(path.parent)
  try:
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise ConfigError(f"config file {path} has no get_config() function")
    return module.get_config(arg) if arg else module.get_config()
  finally:
    _LOADING.pop()


NAMED_GROUPS = {"model": "models.py"}  # config groups a name may replace: `--config.model=qwen2.5-0.5b`


def named_group(path: str, name: str, old: Mapping[str, Any]) -> dict[str, Any]:
  """The group `path` replaced by the named one (`models.py:NAME`): its keys, and the old group's other keys at
  their defaults (`HASH_NEUTRAL`: dtype, remat, attention, ...), unless the named group sets them."""
  name = name.strip("'\"")
  try:
    named = load_config(f"{NAMED_GROUPS[path]}:{name}").to_dict()
  except KeyError as e:
    raise ConfigError(f"{path}={name}: {e.args[0]}") from None
  return {k: HASH_NEUTRAL[k] for k in old if k in HASH_NEUTRAL} | named


# keys that moved: old dotted path -> new one (e.g. "grpo.kl_coef" -> "grpo.kl.coef"), registered by the modules whose
# blocks changed shape (`jaxstages.stages.rl`), so an override of an old path fails naming the new one
MOVED_KEYS: dict[str, str] = {}


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
  """Applies command-line overrides `a.b.c=value` (values as Python literals; bare words stay strings). A group
  in `NAMED_GROUPS` takes a name: `model=qwen2.5-0.5b` is that size's whole model block.

  A key that is not in the config fails with the nearest valid names at its level, so `--config.optim.lrr=1e-3`
  never silently adds a key nobody reads.
  """
  config = ml_collections.ConfigDict(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r} must look like key.path=value")
    path, _, raw = item.partition("=")
    *parents, leaf = path.split(".")
    node, where = config, "config"
    for part in parents:
      check_keys([part], node.keys(), where)
      node, where = node[part], f"{where}.{part}"
      if not isinstance(node, (ml_collections.ConfigDict, dict)):
        raise ConfigError(f"{where} is a value, not a group of keys; cannot set {path}")
    if path in MOVED_KEYS and (leaf not in node or isinstance(node[leaf], (ml_collections.ConfigDict, dict))):
      raise ConfigError(f"{path} is now {MOVED_KEYS[path]}")
    check_keys([leaf], node.keys(), where)
    if path in NAMED_GROUPS and isinstance(node[leaf], (ml_collections.ConfigDict, dict)):
      with node.ignore_type() if isinstance(node, ml_collections.ConfigDict) else contextlib.nullcontext():
        node[leaf] = named_group(path, raw, node[leaf])
      continue
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      if node[leaf] is not None and not isinstance(node[leaf], str):
        raise ConfigError(f"{path}={raw!r}: not a Python literal, and {path} holds a value of type "
                          f"{type(node[leaf]).__name__}, not a string") from None
      value = raw
    with node.ignore_type() if isinstance(node, ml_collections.ConfigDict) else contextlib.nullcontext():
      node[leaf] = value
  return config
