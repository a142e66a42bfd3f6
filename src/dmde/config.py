"""Configuration: one dataclass per stage, YAML on top, ``key=value`` overrides from the CLI.

A run's resolved configuration is written next to its outputs (``config.yaml``) so that
anyone can rerun it. Nested dataclasses map to nested YAML mappings; an override such as
``experts.epochs=3`` walks into them. Unknown keys are an error, never silently ignored.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from dmde.errors import DmdeFileError, DmdeValueError
from dmde.io import sha256_of, write_text

T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass (possibly nested) as plain dicts/lists, ready for YAML or JSON."""
    return dataclasses.asdict(cfg)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclass fields.

    Keys that ``cls`` does not have raise :class:`DmdeValueError` naming them.
    """
    data = dict(data or {})
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise DmdeValueError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"known: {', '.join(sorted(names))}"
        )
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        tp = hints.get(f.name)
        if _is_dataclass_type(tp) and isinstance(value, Mapping):
            value = from_dict(tp, value, where=f"{where}.{f.name}" if where else f.name)
        kwargs[f.name] = value
    return cls(**kwargs)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["a.b=3", "c=[1, 2]"]`` -> ``{"a": {"b": 3}, "c": [1, 2]}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise DmdeValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise DmdeValueError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise DmdeValueError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, merging nested mappings key by key."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise DmdeFileError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DmdeValueError(f"config file {p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise DmdeValueError(f"config file {p} must hold a mapping at the top level")
    return data


def load_config(
    cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
) -> T:
    """Resolve a config: dataclass defaults < ``base`` < YAML file < ``key=value`` overrides."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = deep_merge(data, read_yaml(path))
    data = deep_merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_hash(obj: Any) -> str:
    """A short stable hash of a config (dataclass or plain data), for deciding what to redo."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = to_dict(obj)
    return sha256_of(obj)
