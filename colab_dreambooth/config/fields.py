"""Field metadata: the one place where a setting's label, help, group and limits are declared.

Every configuration field is a dataclass field whose ``metadata["setting"]`` holds a
:class:`Setting`. JSON load/save, validation, the CLI and the notebook forms all read it,
so a field is declared once.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

GROUPS = ("Model", "Parameters", "Advanced", "Saving", "Sampling", "Concepts", "Class images")


@dataclass(frozen=True)
class Setting:
    """How one configuration field is presented and checked."""

    label: str
    help: str
    group: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    path: bool = False  # a file or folder: forms show a path picker


def setting(
    default: Any,
    label: str,
    help: str,
    group: str,
    *,
    choices: tuple[Any, ...] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    path: bool = False,
) -> Any:
    """Declare a dataclass field together with its :class:`Setting`."""
    assert group in GROUPS, group
    meta = {"setting": Setting(label, help, group, choices, minimum, maximum, path)}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class FieldSpec:
    """A configuration field as the rest of the package sees it."""

    name: str
    type: Any  # the base type: str, int, float, bool or list
    optional: bool  # None ("blank") is allowed
    default: Any
    setting: Setting


def field_specs(cls: type) -> dict[str, FieldSpec]:
    """The fields of a configuration dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    specs = {}
    for f in dataclasses.fields(cls):
        if "setting" not in f.metadata:
            continue
        base, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        specs[f.name] = FieldSpec(f.name, base, optional, default, f.metadata["setting"])
    return specs


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    origin = typing.get_origin(hint)
    return (origin or hint), False


def coerce(spec: FieldSpec, value: Any) -> Any:
    """Check a JSON value against a field's type; return it (ints widened to float).

    Raises ``TypeError`` with a message saying what was expected.
    """
    if value is None:
        if spec.optional:
            return None
        raise TypeError(f"must not be blank (null); expected {_type_name(spec.type)}")
    if spec.type is bool:
        if isinstance(value, bool):
            return value
    elif spec.type is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif spec.type is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # json reads NaN and Infinity; no setting means them
                raise TypeError(f"expected a finite number, got {value!r}")
            return float(value)
    elif spec.type is str:
        if isinstance(value, str):
            return value
    elif spec.type is list:
        if isinstance(value, list):
            return value
    else:  # pragma: no cover - a field of a type this module does not know
        raise AssertionError(spec.type)
    raise TypeError(f"expected {_type_name(spec.type)}, got {type(value).__name__} {value!r}")


def _type_name(t: Any) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number",
            str: "text", list: "a list"}.get(t, str(t))
