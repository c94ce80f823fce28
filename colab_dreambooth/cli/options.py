"""Command-line options derived from the settings' declarations: for a run, ``--config PARAMS``
plus one ``--field-name VALUE`` override per field (``none`` blanks it); for the model commands,
one option per field of their settings dataclass (:mod:`colab_dreambooth.config.commands`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TypeVar

from colab_dreambooth.config.fields import FieldSpec, field_specs
from colab_dreambooth.config.params import load_params
from colab_dreambooth.config.settings import DreamBoothConfig

OVERRIDABLE = {name: spec for name, spec in field_specs(DreamBoothConfig).items()
               if spec.type in (str, int, float, bool)}
# What an option of a field that may be blank takes to blank it (``--max-train-steps none``).
BLANK_WORDS = ("none", "blank", "auto")


class _Blank:
    """Parsed value of ``none`` for a field that may be blank (None means "not given")."""

    def __repr__(self) -> str:
        return "BLANK"


BLANK = _Blank()
S = TypeVar("S")


def add_settings_options(p: argparse.ArgumentParser, cls: type,
                         **changes: dict[str, Any]) -> None:
    """One option per field of the settings dataclass ``cls``, at the field's default:
    ``--name VALUE``, or ``--name`` for a switch (and ``--no-name`` when it is on by default).
    ``changes[name]`` adds to or replaces the argparse arguments of one option (e.g. ``nargs``)."""
    for name, spec in field_specs(cls).items():
        help = spec.setting.help  # a blank default's meaning is in the help
        if spec.default not in (None, ""):
            help += f" (default: {_shown(spec.default)})"
        kwargs: dict[str, Any] = {"default": spec.default, "dest": name,
                                  "help": help.replace("%", "%%")}
        option = "--" + name.replace("_", "-")
        if spec.type is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=_ranged(spec), metavar=_metavar(spec).removesuffix("|none"))
            if spec.setting.choices:
                kwargs["choices"] = spec.setting.choices
        kwargs.update(changes.get(name, {}))
        p.add_argument(option, **kwargs)
        if spec.type is bool and spec.default:  # BooleanOptionalAction's help varies by version
            p.add_argument("--no-" + option[2:], dest=name, action="store_false",
                           default=spec.default, help=f"turn {option} off")


def _ranged(spec: FieldSpec):
    """The field's type for argparse, refusing values outside its limits (a usage error)."""
    convert, low, high = spec.type, spec.setting.minimum, spec.setting.maximum
    if low is None and high is None:
        return convert

    def checked(text: str):
        try:
            value = convert(text)
        except ValueError:
            kind = "a whole number" if convert is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            limits = (f"from {low:g} to {high:g}" if low is not None and high is not None
                      else f"at least {low:g}" if low is not None else f"at most {high:g}")
            raise argparse.ArgumentTypeError(f"must be {limits}, got {text}")
        return value

    checked.__name__ = convert.__name__  # argparse names the type in its error messages
    return checked


def _shown(default: Any) -> str:
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default)


def settings_from_args(args: argparse.Namespace, cls: type[S]) -> S:
    """The settings dataclass ``cls`` as the options of :func:`add_settings_options` set it."""
    return cls(**{name: getattr(args, name) for name in field_specs(cls)})


def add_config_options(p: argparse.ArgumentParser) -> None:
    """``--config PARAMS`` and one override option per field of a run."""
    p.add_argument("--config", type=Path, required=True, help="parameters JSON")
    group = p.add_argument_group("overrides (any field of the parameters JSON)")
    for name, spec in OVERRIDABLE.items():
        group.add_argument("--" + name.replace("_", "-"), dest=f"set_{name}",
                           type=_parser_type(spec), default=None, metavar=_metavar(spec),
                           help=f"{spec.setting.label}: {spec.setting.help}".replace("%", "%%"))


def _parser_type(spec: FieldSpec):
    convert = _boolean if spec.type is bool else spec.type
    if not spec.optional:
        return convert

    def optional(text: str):
        if text.strip().lower() in BLANK_WORDS + ("",):
            return BLANK
        return convert(text)

    optional.__name__ = convert.__name__  # argparse names the type in its error messages
    return optional


def _metavar(spec: FieldSpec) -> str:
    if spec.setting.choices:
        blank = ("auto",) if spec.optional else ()
        return "{" + ",".join(map(str, spec.setting.choices + blank)) + "}"
    metavar = {bool: "true|false", int: "N", float: "X", str: "TEXT"}[spec.type]
    return metavar + "|none" if spec.optional else metavar


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def config_from_args(args: argparse.Namespace) -> DreamBoothConfig:
    """The parameters JSON of ``--config`` with the command-line overrides applied."""
    config = load_params(args.config)
    changes = {name: getattr(args, f"set_{name}") for name in OVERRIDABLE
               if getattr(args, f"set_{name}") is not None}
    changes = {name: None if value is BLANK else value for name, value in changes.items()}
    return config.copy(**changes) if changes else config
