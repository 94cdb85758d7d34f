"""Configs are dataclasses; YAML files fill them. One loader for every config in the package."""

from __future__ import annotations

import dataclasses
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _build(cls: type, data: Any, where: str) -> Any:
    if not dataclasses.is_dataclass(cls):
        return data
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ValueError(f"config {where or '<root>'}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"config {where or '<root>'}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        path = f"{where}.{key}" if where else key
        kwargs[key] = _build(hint, value, path) if dataclasses.is_dataclass(hint) else _coerce(hint, value, path)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Numbers written as YAML strings ("3e-3" is a string to YAML 1.1) become the field's number type."""
    wanted = [t for t in (typing.get_args(hint) or (hint,)) if t in (int, float)]
    if isinstance(value, str) and wanted:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"config {where}: expected a number, got {value!r}") from None
        return int(number) if wanted[0] is int and number.is_integer() else number
    if isinstance(value, int) and not isinstance(value, bool) and float in wanted and int not in wanted:
        return float(value)
    return value


def from_dict(cls: type[T], data: dict | None) -> T:
    """Build dataclass `cls` from a (nested) mapping; unknown keys are an error, not silently ignored."""
    return _build(cls, data or {}, "")


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Apply an override such as `model.hidden_size=64` to a nested mapping."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def parse_overrides(pairs: list[str] | None) -> dict:
    """`["a.b=1", "c=x"]` -> nested dict; values parsed as YAML scalars (numbers, booleans, lists)."""
    out: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"override {pair!r}: expected KEY=VALUE")
        key, raw = pair.split("=", 1)
        set_dotted(out, key.strip(), yaml.safe_load(raw))
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_yaml(path: str | Path) -> dict:
    """Read a YAML file; `pkg:NAME` reads `gts_lum/configs/NAME` shipped with the package."""
    text = (
        resources.files("gts_lum.configs").joinpath(str(path)[4:]).read_text() if str(path).startswith("pkg:") else Path(path).read_text()
    )
    return yaml.safe_load(text) or {}


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | dict | None = None) -> T:
    data = read_yaml(path) if path else {}
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    return from_dict(cls, deep_merge(data, extra))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def struct_parameter(value: dict | None) -> dict:
    """A KFP `dict` (STRUCT) pipeline parameter as it was written: protobuf's Struct holds every number as a
    double, so integral numbers (2.0) come back as ints; a float field still takes them (`from_dict`)."""

    def fix(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        return int(v) if isinstance(v, float) and v.is_integer() else v

    return fix(value or {})
