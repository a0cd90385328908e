"""Strict, typed configs: frozen dataclasses loaded from YAML.

Each component owns its config dataclass (``ModelConfig`` lives in ``model.py``,
``LossConfig`` in ``losses.py`` ...). This module only knows how to turn nested
dicts into those dataclasses *strictly*:

* an unknown key is an error that names the section and the closest valid key;
* a wrong type is an error that names the key, the expected type and the value;
* a missing required key is an error.

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``tuple[T, ...]``,
``Literal[...]``, ``X | None`` and nested frozen dataclasses. Nothing else, on
purpose: configs stay plain data.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not match the dataclass schema."""


def _closest(name: str, options: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    if match:
        return f" (did you mean '{match[0]}'?)"
    return f" (valid keys: {', '.join(sorted(options))})"


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return the converted value."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(e)
        # A mismatch deep inside one alternative (a list item, a nested key) is the more
        # precise message; a mismatch of the value itself names the whole union.
        if len(errors) == 1 and not str(errors[0]).startswith(f"{where}: expected"):
            raise errors[0]
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            hint = _closest(str(value), [str(c) for c in choices]) if isinstance(value, str) else ""
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}{hint}")
        return value
    if origin is tuple:
        (item_tp, *rest) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return tuple(_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a section (mapping) for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        # YAML 1.1 reads ``1e-6`` (no dot) as a string; accept what is clearly a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected float, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected str, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {tp!r} at {where}")


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; every key checked, nothing swallowed.

    ``where`` is the dotted path of this section ("" for the top level), used in messages.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            section = f"section '{where}'" if where else "the top level"
            raise ConfigError(f"unknown key '{key}' in {section}{_closest(str(key), list(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{_join(where, name)}' (expected {_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # __post_init__ semantic checks
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def check_types(cfg: Any) -> None:
    """For configs built in code (not from YAML): every field's value matches its
    annotation (a Literal choice, int not str, ...), else ConfigError naming the field.
    Call from ``__post_init__``."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        if not dataclasses.is_dataclass(hints[f.name]):
            _convert(getattr(cfg, f.name), hints[f.name], f.name)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def to_dict(cfg: Any) -> Any:
    """Dataclass -> plain YAML/JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    return cfg


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw dict."""
    raw = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}': empty key in '{dotted}'")
        value = yaml.safe_load(text) if text.strip() else ""
        node = raw
        for p in parts[:-1]:
            child = node.get(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
            node[p] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return raw


# The configs that ship inside the package (``configs/`` in a checkout links here), so an
# installed latentae finds them by name: ``--config tiny-f8c4``.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def packaged_configs() -> list[str]:
    """Names of the configs shipped with the package (``tiny-f8c4``, ``sd-f8c4``, ...)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def config_path(name_or_path: str | Path) -> Path:
    """A YAML file: an existing path, else a packaged config by name (``sd-f8c4`` or
    ``sd-f8c4.yaml``). A local file always wins over a packaged name."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    name = str(name_or_path)
    if "/" not in name and os.sep not in name:
        packaged = CONFIG_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
        if packaged.is_file():
            return packaged
    raise ConfigError(f"config file not found: {p} (packaged configs, usable by name: {', '.join(packaged_configs())})")


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def replace(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` that re-runs strict validation."""
    return from_dict(type(cfg), {**to_dict(cfg), **{k: to_dict(v) for k, v in changes.items()}})
