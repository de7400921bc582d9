"""Builds typed, validated config dataclasses from TOML tables.

An unknown key, a value of the wrong type or a value a config's ``__post_init__``
rejects becomes a :class:`ConfigError` that names the key (``section.key``) and
the value, so a user can fix the job file without reading code.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A job file is malformed; the message names the key and the value."""


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        (arg, *_) = typing.get_args(tp) or (Any,)
        return isinstance(value, list | tuple) and all(_type_ok(v, arg) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def build(cls: type[T], table: Any, section: str) -> T:
    """Builds dataclass ``cls`` from a TOML table, naming ``section.key`` in every error."""
    if table is None:
        table = {}
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] must be a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(
                f"{section}.{key}={value!r}: unknown key; known keys of [{section}]: {', '.join(sorted(fields))}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            kwargs[key] = build(tp, value, f"{section}.{key}")
            continue
        if not _type_ok(value, tp):
            raise ConfigError(f"{section}.{key}={value!r}: expected {_type_name(tp)}")
        allowed = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
        if isinstance(value, int) and not isinstance(value, bool) and float in allowed and int not in allowed:
            value = float(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        msg = str(e)
        # Config classes name their own fields ("world_size=0: ..."); prefix the section.
        if not msg.startswith(f"{section}."):
            msg = f"{section}.{msg}"
        raise ConfigError(msg) from e
