"""One widget per configuration field, chosen from the field's type and metadata alone.

A :class:`FieldControl` wraps the input widget, parses what the user typed into the field's
type (raising :class:`ValueError` with a message when it cannot), and shows the validation
messages of that field right under it. :func:`make_control` picks the kind of control from the
:class:`~colab_dreambooth.config.fields.FieldSpec`; no field has code of its own.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Callable

import ipywidgets as w

from colab_dreambooth.config.fields import FieldSpec
from colab_dreambooth.errors import Problem

from .compat import set_help

LABEL_WIDTH = "260px"
INPUT_WIDTH = "640px"
# Three-way choice of an Optional[bool]: blank lets the package decide (e.g. on with a GPU).
TRISTATE = (("auto", None), ("on", True), ("off", False))
AUTO = "auto"


class FieldControl:
    """The widget of one field: label (the extension's), tooltip (its help), message line."""

    def __init__(self, spec: FieldSpec, input_widget: w.DOMWidget,
                 hint: w.DOMWidget | None = None):
        self.spec = spec
        self.input = input_widget
        self.input.description = spec.setting.label
        set_help(self.input, spec.setting.help)
        self.input.style = {"description_width": LABEL_WIDTH}
        self.input.layout = w.Layout(width=INPUT_WIDTH)
        self.message = w.HTML(layout=w.Layout(display="none", margin=f"0 0 4px {LABEL_WIDTH}"))
        self.shown: list[str] = []  # the problems now shown under the field
        row = [self.input] + ([hint] if hint is not None else [])
        self.widget = w.VBox([w.HBox(row), self.message])

    @property
    def name(self) -> str:
        """The field's key in the parameters JSON."""
        return self.spec.name

    def get(self) -> Any:
        """The field's value; raises ValueError saying what is wrong with the typed text."""
        return self.input.value

    def set(self, value: Any) -> None:
        """Show ``value`` in the widget."""
        self.input.value = value

    def observe(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever the user changes the value."""
        self.input.observe(lambda _change: callback(), names="value")

    def show(self, messages: list[str]) -> None:
        """Show these problems under the field (none hides the line)."""
        self.shown = list(messages)
        if messages:
            lines = "<br>".join(f"&#9888; {html.escape(m)}" for m in messages)
            self.message.value = f"<span style='color:#c62828'>{lines}</span>"
            self.message.layout.display = None
        else:
            self.message.value = ""
            self.message.layout.display = "none"


class CheckboxControl(FieldControl):
    """A bool: a checkbox."""

    def __init__(self, spec: FieldSpec):
        super().__init__(spec, w.Checkbox(value=bool(spec.default), indent=True))


class TriStateControl(FieldControl):
    """An Optional[bool]: auto (blank) / on / off."""

    # A Dropdown whose value is None shows no selection at all, so "auto" is a string there.
    def __init__(self, spec: FieldSpec):
        super().__init__(spec, w.Dropdown(options=[(label, _tri(v)) for label, v in TRISTATE],
                                          value=_tri(spec.default)))

    def get(self) -> bool | None:
        return None if self.input.value == AUTO else self.input.value

    def set(self, value: bool | None) -> None:
        self.input.value = _tri(value)


def _tri(value: bool | None) -> bool | str:
    return AUTO if value is None else value


class ChoiceControl(FieldControl):
    """A field with fixed choices: a dropdown (led by "auto" when the field may be blank)."""

    def __init__(self, spec: FieldSpec):
        options = [(str(c), c) for c in spec.setting.choices or ()]
        if spec.optional:  # blank lets the GPU preset choose; "auto" stands for it (see TRISTATE)
            options.insert(0, (AUTO, AUTO))
        default = AUTO if spec.default is None and spec.optional else spec.default
        super().__init__(spec, w.Dropdown(options=options, value=default))

    def _shown(self, value: Any) -> Any:
        return AUTO if value is None and self.spec.optional else value

    def get(self) -> Any:
        return None if self.spec.optional and self.input.value == AUTO else self.input.value

    def set(self, value: Any) -> None:
        value = self._shown(value)
        # A loaded file may hold a value that is not a choice: show it so validation can say so.
        if value not in [v for _, v in self.input.options]:
            self.input.options = list(self.input.options) + [(str(value), value)]
        self.input.value = value


class TextControl(FieldControl):
    """A text field; a path field gets a hint saying whether the path exists here."""

    def __init__(self, spec: FieldSpec):
        self.hint = w.HTML() if spec.setting.path else None
        placeholder = "a path on this machine" if spec.setting.path else ""
        super().__init__(spec, w.Text(value=spec.default, placeholder=placeholder,
                                      continuous_update=True), self.hint)
        if self.hint is not None:
            self.input.observe(lambda _c: self._update_hint(), names="value")
            self._update_hint()

    def _update_hint(self) -> None:
        text = self.input.value.strip()
        path = Path(text).expanduser() if text else None
        if path is not None and path.is_dir():
            self.hint.value = "<span style='color:#2e7d32'>&#128193; folder found</span>"
        elif path is not None and path.is_file():
            self.hint.value = "<span style='color:#2e7d32'>&#128196; file found</span>"
        else:
            self.hint.value = ""


class NumberControl(FieldControl):
    """An int or float, typed as text so blanks and typos can be told apart and reported.

    The range from the field's metadata is the placeholder; values outside it are kept and
    reported by validation rather than silently clamped.
    """

    def __init__(self, spec: FieldSpec):
        super().__init__(spec, w.Text(value=format_number(spec.default),
                                      placeholder=_range_hint(spec), continuous_update=True))

    def get(self) -> Any:
        return parse_number(self.spec, self.input.value)

    def set(self, value: Any) -> None:
        self.input.value = format_number(value)


def make_control(spec: FieldSpec) -> FieldControl:
    """The fitting control for a field, from its type and metadata."""
    if spec.type is bool:
        return TriStateControl(spec) if spec.optional else CheckboxControl(spec)
    if spec.setting.choices is not None:
        return ChoiceControl(spec)
    if spec.type in (int, float):
        return NumberControl(spec)
    if spec.type is str:
        return TextControl(spec)
    raise TypeError(f"no form control for field {spec.name} of type {spec.type}")


def format_number(value: Any) -> str:
    """The text a number box shows: '' for blank, shortest exact form otherwise."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # 2e-06, 0.9999, 7.5: exact and short
    return str(value)


def parse_number(spec: FieldSpec, text: str) -> int | float | None:
    """Parse a number box's text for ``spec``; ValueError says what to type instead."""
    text = text.strip()
    whole = spec.type is int
    kind = "a whole number" if whole else "a number"
    if not text:
        if spec.optional:
            return None
        raise ValueError(f"blank: enter {kind}")
    try:
        number = float(text)
    except ValueError:
        if "," in text and not whole:
            raise ValueError(f"'{text}' is not a number: use a dot for decimals (e.g. 2.5)") \
                from None
        raise ValueError(f"'{text}' is not {kind}") from None
    if not math.isfinite(number):
        raise ValueError(f"'{text}' is not a finite number")
    if whole:
        try:
            return int(text)  # exact for big ints that float would round
        except ValueError:
            if not number.is_integer():
                raise ValueError(f"'{text}' is not a whole number") from None
            return int(number)
    return number


def _range_hint(spec: FieldSpec) -> str:
    s = spec.setting
    low, high = s.minimum, s.maximum
    if low is not None and high is not None:
        hint = f"{low:g} to {high:g}"
    elif low is not None:
        hint = f"at least {low:g}"
    elif high is not None:
        hint = f"at most {high:g}"
    else:
        hint = "a whole number" if spec.type is int else "a number"
    return f"blank or {hint}" if spec.optional else hint


def read_controls(controls: dict[str, FieldControl], specs: dict, prefix: str
                  ) -> tuple[dict[str, Any], list[Problem]]:
    """Every control's typed value (its field's default where a box cannot be parsed) and a
    :class:`Problem` per box that cannot, named ``prefix + field``."""
    values: dict[str, Any] = {}
    problems: list[Problem] = []
    for name, control in controls.items():
        try:
            values[name] = control.get()
        except ValueError as exc:
            values[name] = specs[name].default
            problems.append(Problem(prefix + name, str(exc)))
    return values, problems
