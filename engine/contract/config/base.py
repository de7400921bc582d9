"""The job config's shared base: a frozen, strict pydantic model, and its one error type.

Every section derives from :class:`Section`: unknown keys, non-finite numbers and an int
given for a bool (or a bool for an int) are errors; a float field also takes a TOML int.
Pydantic's ``ValidationError`` becomes a :class:`ConfigError` in one place,
:func:`config_error`, whose message names ``section.key=value`` and the reason.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A job file is malformed; the message names the key and the value."""


class FieldError(ValueError):
    """Raised by a validator: ``key`` (relative to the model validated) holds ``value``, rejected for ``reason``."""

    def __init__(self, key: str, value: Any, reason: str) -> None:
        super().__init__(f"{key}={value!r}: {reason}")
        self.key, self.value, self.reason = key, value, reason


class _SectionError(ConfigError):
    """A section's own errors, kept raw: validated nested in a job, they are re-rendered at their place."""

    def __init__(self, e: ValidationError, model: type[BaseModel], prefix: tuple[int | str, ...]) -> None:
        super().__init__(str(config_error(e, model, prefix)))
        self.errors, self.model = e.errors(include_url=False), model

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str]]:
        return ConfigError, (str(self),)  # pickles (across Ray) as the plain error it reads as


class Section(BaseModel):
    """One ``[section]`` of the job file; constructing it directly raises :class:`ConfigError` too."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
    section: ClassVar[str] = ""  # the TOML table name, for messages

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            # Pydantic calls a custom __init__ for nested sections too: _one re-renders these there.
            raise _SectionError(e, type(self), (self.section,) if self.section else ()) from None


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _model_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that validates the table at ``loc`` under ``root``."""
    tp: Any = root
    for part in loc:
        if isinstance(part, int):
            continue  # an item of a list: its type is the list's argument, already taken
        if not (isinstance(tp, type) and issubclass(tp, BaseModel)) or part not in tp.model_fields:
            return None
        tp = tp.model_fields[part].annotation
        if typing.get_origin(tp) in (list, tuple):
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) in (typing.Union, types.UnionType):
            return None
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _choices(expected: str) -> list[str]:
    # "'a', 'b' or 'c'" and "<Role.DRIVER: 'driver'> or ..." both spell the values in quotes
    return re.findall(r"'([^']*)'", expected)


_TYPE_NAMES = {
    "int_type": "int",
    "float_type": "float",
    "bool_type": "bool",
    "string_type": "str",
    "list_type": "list",
}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def _one(err: Any, root: type[BaseModel], prefix: tuple[int | str, ...]) -> str:
    loc = prefix + tuple(err["loc"])
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    where = _path(loc)
    if kind == "value_error" and isinstance(ctx.get("error"), _SectionError):
        sub = ctx["error"]
        return "\n".join(_one(inner, sub.model, loc) for inner in sub.errors)
    if kind == "value_error" and isinstance(ctx.get("error"), FieldError):
        fe = ctx["error"]
        return f"{_path((*loc, fe.key))}={fe.value!r}: {fe.reason}"
    if kind == "value_error":
        return f"{where}: {ctx.get('error', err['msg'])}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"[{where}] must be a table, got {value!r}"
    if kind == "list_type" and loc == ("faults",):
        return f"faults={value!r}: must be an array of tables ([[faults]])"
    if kind == "extra_forbidden":
        if len(loc) == 1:
            known = ", ".join(root.model_fields)
            return f"{where}={value!r}: unknown section; known sections: {known}"
        model = _model_at(root, loc[len(prefix) : -1])
        known = ", ".join(sorted(model.model_fields)) if model else "?"
        return f"{where}={value!r}: unknown key; known keys of [{_path(loc[:-1])}]: {known}"
    if kind == "missing":
        return f"{where}: required"
    if kind in _TYPE_NAMES:
        return f"{where}={value!r}: expected {_TYPE_NAMES[kind]}"
    if kind in ("literal_error", "enum"):
        return f"{where}={value!r}: must be one of {_choices(ctx.get('expected', ''))}"
    if kind in _BOUNDS:
        bound = next(v for k, v in ctx.items() if k in ("ge", "gt", "le", "lt"))
        return f"{where}={value!r}: must be {_BOUNDS[kind]} {bound}"
    if kind == "finite_number":
        return f"{where}={value!r}: must be a finite number"
    return f"{where}={value!r}: {err['msg']}"


def config_error(
    e: ValidationError, root: type[BaseModel], prefix: tuple[int | str, ...] = ()
) -> ConfigError:
    """Pydantic's errors as one :class:`ConfigError`: ``section.key=value: reason``, one per line."""
    return ConfigError("\n".join(_one(err, root, prefix) for err in e.errors(include_url=False)))
