"""Field metadata: the one place where everything about a setting is declared.

Every configuration field is a dataclass field whose ``metadata["setting"]`` holds a
:class:`Setting`: its label, help, group (hence its form tab), limits and choices, whether a
GPU preset fills it when blank and whether a resumed run must keep it. JSON load/save,
validation, the GPU presets, checkpoints, the CLI and the notebook forms all read it, so a field
is declared once. The commands' own settings (:mod:`colab_dreambooth.config.commands`) are
declared the same way.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from colab_dreambooth.errors import Problem

# Each group of settings and the form tab that shows it, in the tabs' order. Class-image
# settings are per concept, so they sit in the concept blocks, as in the extension.
GROUP_TABS = {"Model": "Model", "Parameters": "Parameters", "Advanced": "Advanced",
              "Concepts": "Concepts", "Class images": "Concepts", "Saving": "Saving",
              "Sampling": "Sampling"}
GROUPS = tuple(GROUP_TABS)
TABS = tuple(dict.fromkeys(GROUP_TABS.values()))


@dataclass(frozen=True)
class Setting:
    """How one configuration field is presented, checked and treated by presets and resume."""

    label: str
    help: str
    group: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    path: bool = False  # a file or folder: forms show a path picker
    # Its column in the GPU preset table (None: no preset fills it). Blank (None) means "let the
    # preset decide" for these fields.
    preset_column: int | None = None
    # It changes what a checkpoint's tensors or batches mean: resuming with another value
    # cannot continue the same run, so it is refused.
    must_match: bool = False
    # Shown only when each named field holds one of the listed values (e.g. a Lora Type's own
    # fields); a hidden field keeps its value and is still saved.
    shown_when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    @property
    def tab(self) -> str:
        """The form tab that shows the field."""
        return GROUP_TABS[self.group]


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
    preset_column: int | None = None,
    must_match: bool = False,
    shown_when: dict[str, tuple[Any, ...]] | None = None,
) -> Any:
    """Declare a dataclass field together with its :class:`Setting`."""
    assert group in GROUPS, group
    assert default is None or preset_column is None, "a preset fills only blank fields"
    meta = {"setting": Setting(label, help, group, choices, minimum, maximum, path,
                               preset_column, must_match,
                               tuple((name, tuple(values))
                                     for name, values in (shown_when or {}).items()))}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def same_setting(cls: type, name: str) -> Any:
    """Declare a field exactly as field ``name`` of ``cls`` is declared (default and
    :class:`Setting`), for a form that offers a command's option: their defaults cannot
    disagree."""
    original = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.field(default=original.default, default_factory=original.default_factory,
                             metadata=original.metadata)


@dataclass(frozen=True)
class FieldSpec:
    """A configuration field as the rest of the package sees it."""

    name: str
    type: Any  # the base type: str, int, float, bool or list
    optional: bool  # None ("blank") is allowed
    default: Any
    setting: Setting


def is_shown(setting: Setting, values: dict[str, Any]) -> bool:
    """True when a field applies to ``values`` (field name -> value), see ``shown_when``."""
    return all(values.get(name) in allowed for name, allowed in setting.shown_when)


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


def preset_fields(cls: type) -> tuple[str, ...]:
    """The fields a GPU preset fills when blank, in the preset table's column order."""
    columns = {spec.setting.preset_column: name for name, spec in field_specs(cls).items()
               if spec.setting.preset_column is not None}
    return tuple(columns[column] for column in sorted(columns))


def must_match_fields(cls: type) -> tuple[str, ...]:
    """The fields a resumed run must keep (see :attr:`Setting.must_match`)."""
    return tuple(name for name, spec in field_specs(cls).items() if spec.setting.must_match)


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
            return _declared_choice(spec, value)
    elif spec.type is list:
        if isinstance(value, list):
            return value
    else:  # pragma: no cover - a field of a type this module does not know
        raise AssertionError(spec.type)
    raise TypeError(f"expected {_type_name(spec.type)}, got {type(value).__name__} {value!r}")


def _declared_choice(spec: FieldSpec, value: str) -> str:
    """A choice as declared when ``value`` differs only in case ("locon", "FP16"), as the
    extension's and kohya's files and tutorials write them; otherwise ``value`` unchanged
    (validation names the choices)."""
    choices = spec.setting.choices or ()
    if value in choices:
        return value
    same = [c for c in choices if isinstance(c, str) and c.casefold() == value.casefold()]
    return same[0] if len(same) == 1 else value


def coerce_into(values: dict[str, Any], spec: FieldSpec, value: Any, where: str,
                problems: list[Problem]) -> None:
    """Set ``values[spec.name]`` to ``value`` checked by :func:`coerce`, or add a
    :class:`Problem` at ``where`` saying what was expected. A null for a field that may not be
    blank is skipped, so the field keeps its default: the extension writes null for fields left
    blank."""
    if value is None and not spec.optional:
        return
    try:
        values[spec.name] = coerce(spec, value)
    except TypeError as exc:
        problems.append(Problem(where, str(exc)))


def _type_name(t: Any) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number",
            str: "text", list: "a list"}.get(t, str(t))
