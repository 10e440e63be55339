"""Configs as typed dataclasses, read from YAML plus dotted overrides.

``unmask rl recipe.yaml rl.beta=0.01 sampler.gen_length=128``: the file gives a recipe, the
overrides change single fields. Every key is checked against the dataclass, and a wrong name
or type is an error naming the field and where it came from (the file, or the override that
set it), never a stack trace from deep inside.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from unmask.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the config's fields.

    ``field`` is the dotted name of the offending field when known, so that
    :func:`load_config` can tell whether the file or an override set it. Also a
    ``ValueError``: callers that catch bad values catch bad config values too.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, checking names and types recursively."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(
            f"{where or 'config'}: expected a mapping, got {type(data).__name__}", where or None
        )
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise _unknown_field(cls, where, unknown[0], sorted(fields))
    kwargs = {name: _coerce(hints[name], value, _join(where, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # the dataclass's own checks name their field
        raise ConfigError(str(err)) from err


def _unknown_field(cls: type, where: str, name: str, known: list[str]) -> ConfigError:
    """The error for a misspelt field: the closest known name, or all of them."""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {_join(where, close[0])}?" if close else f"known: {', '.join(known)}"
    field = _join(where, name)
    return ConfigError(f"unknown field '{field}' of {cls.__name__} ({hint})", field=field)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain dict of a config (for saving it next to a run)."""
    return dataclasses.asdict(config)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Read ``path`` (YAML) into ``cls``, then apply ``key.sub=value`` overrides."""
    data = _read_yaml(path) if path is not None else {}
    set_by: dict[str, str] = {}  # dotted key -> the override that set it
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        _set_dotted(data, key, _parse_yaml(raw, f"override {item}") if raw.strip() else None)
        set_by[key] = item
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        source = _source(err, set_by) or (str(path) if path is not None else None)
        raise ConfigError(f"{source}: {err}" if source else str(err), err.field) from err


def _read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
    data = _parse_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields")
    return data


def _parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load``, its (multi-line) error reduced to one line naming the place."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML{at}: {problem}") from err


def _source(err: ConfigError, set_by: dict[str, str]) -> str | None:
    """``override key=value`` when the latest override touching the bad field set it."""
    for key, item in reversed(set_by.items()):
        if err.field is None:  # a dataclass's own check: its message names the field
            hit = re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", str(err)) is not None
        else:
            field = err.field.split("[")[0]
            hit = field == key or field.startswith(f"{key}.") or key.startswith(f"{field}.")
        if hit:
            return f"override {item}"
    return None


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{where}: {value!r} fits no type of {hint}", where
        )
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, got {value!r}", where)
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a section (mapping), got {value!r}", where)
        return from_dict(hint, value, where)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}", where)
        item = args[0] if args else Any
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}", where)
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}", where)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}", where)
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where} must be a number, got {value!r}", where) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}", where)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}", where)
        return value
    return value
