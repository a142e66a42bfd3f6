"""Configuration: one dataclass per stage, YAML on top, ``key=value`` overrides from the CLI.

A run's resolved configuration is written next to its outputs (``config.yaml``) so that
anyone can rerun it. Nested dataclasses map to nested YAML mappings; an override such as
``experts.epochs=3`` walks into them. Unknown keys are an error, never silently ignored.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from dmde.core.errors import DmdeFileError, DmdeValueError
from dmde.core.io import sha256_of, write_text

T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass (possibly nested) as plain dicts/lists, ready for YAML or JSON."""
    return dataclasses.asdict(cfg)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return {list: "a list", dict: "a mapping", tuple: "a list"}.get(origin, str(tp))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, getattr(
        tp, "__name__", str(tp)))


def _matches(value: Any, tp: Any) -> tuple[bool, Any]:
    """Whether ``value`` (parsed from YAML) fits the annotation ``tp``; the value as the field takes it."""
    if tp is Any or tp is None:
        return True, value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _matches(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return False, value
        if args and args[0] is not Ellipsis:
            out = [_matches(v, args[0]) for v in value]
            return all(ok for ok, _ in out), [v for _, v in out]
        return True, value
    if origin in (dict, Mapping) or tp is dict:
        return isinstance(value, Mapping), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if _is_dataclass_type(tp):
        return isinstance(value, tp), value
    return True, value  # an annotation this checker does not know: the dataclass decides


def check_type(value: Any, tp: Any, key: str) -> Any:
    """``value`` for the config field ``key`` annotated ``tp``, or one :class:`DmdeValueError`
    line naming the key, the value and the type it needs (``groups.size=abc`` is not a traceback)."""
    ok, out = _matches(value, tp)
    if not ok:
        raise DmdeValueError(f"{key}={value!r} must be {_type_name(tp)}")
    return out


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
        key = f"{where}.{f.name}" if where else f.name
        if _is_dataclass_type(tp) and isinstance(value, Mapping):
            value = from_dict(tp, value, where=key)
        else:
            value = check_type(value, tp, key)
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


def without_defaults(settings: dict[str, Any], added: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without those of ``added`` (settings added after runs existed, with their
    defaults) left at their default: what a hash sees, so that runs from before them still match."""
    return {k: v for k, v in settings.items() if added.get(k, object()) != v}


def config_hash(obj: Any) -> str:
    """A short stable hash of a config (dataclass or plain data), for deciding what to redo."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = to_dict(obj)
    return sha256_of(obj)
