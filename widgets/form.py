"""The configuration form, generated from the configuration model.

Every field of :class:`~colab_dreambooth.config.settings.DreamBoothConfig` and of each
:class:`~colab_dreambooth.config.settings.Concept` gets one control chosen by its type and metadata
(:mod:`widgets.controls`), labelled and explained as in the AUTOMATIC1111 extension and grouped
in its tabs. Every change re-validates the whole configuration: each problem shows under its
field, the tab titles count them, and the Train button stays disabled until there are none.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import ipywidgets as w

from colab_dreambooth.config.concept import Concept
from colab_dreambooth.config.fields import TABS, field_specs, is_shown
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.config.validation import validate
from colab_dreambooth.errors import ConfigError, Problem
from colab_dreambooth.models.families import FAMILY, detect_family
from colab_dreambooth.runtime.device import DeviceInfo, detect_device

from .compat import set_titles
from .controls import INPUT_WIDTH, FieldControl, make_control, read_controls
from .environment import runtime_banner
from .params_file import ParamsFile

RUN_SPECS = field_specs(DreamBoothConfig)
CONCEPT_SPECS = field_specs(Concept)
CONCEPT_SECTIONS = ("Concepts", "Class images", "Sampling")
CONCEPTS_FIELD = "concepts_list"  # the one list-typed field: edited as concept blocks
_CONCEPT_WHERE = re.compile(r"^concept (\d+)(?: (\w+))?$")


class ConceptEditor:
    """The controls of one concept, in sections, with a Remove button."""

    def __init__(self, only: frozenset[str] | None = None) -> None:
        self.fields: dict[str, FieldControl] = {
            name: make_control(spec) for name, spec in CONCEPT_SPECS.items()}
        self.remove_button = w.Button(description="Remove this concept", icon="trash",
                                      button_style="warning", layout=w.Layout(width="200px"))
        self.message = w.HTML()
        children: list[w.Widget] = [self.message]
        # Fields left out of ``only`` still exist (and keep their values), unshown.
        shown = [c for c in self.fields.values() if only is None or c.name in only]
        groups = [c.spec.setting.group for c in shown]
        for section in CONCEPT_SECTIONS + tuple(g for g in dict.fromkeys(groups)
                                                if g not in CONCEPT_SECTIONS):
            controls = [c for c in shown if c.spec.setting.group == section]
            if controls:
                title = "Concept" if section == "Concepts" else section
                children.append(w.HTML(f"<h4 style='margin:8px 0 2px'>{title}</h4>"))
                children += [c.widget for c in controls]
        if only is None:  # a partial form edits the concepts it was given, it adds none
            children.append(self.remove_button)
        self.widget = w.VBox(children)

    def set(self, concept: Concept) -> None:
        """Show ``concept`` in the controls."""
        for name, control in self.fields.items():
            control.set(getattr(concept, name))

    def read(self, prefix: str) -> tuple[dict[str, Any], list[Problem]]:
        """The typed values (defaults where a box cannot be parsed) and the parse problems."""
        return read_controls(self.fields, CONCEPT_SPECS, prefix)


class ConfigForm:
    """An ipywidgets form for a whole :class:`DreamBoothConfig`.

    ``form.widget`` is what to display; ``form.config`` builds a fresh configuration from the
    widgets; ``form.problems`` lists what is wrong now; ``form.train_button`` is enabled only
    when nothing is. ``tabs`` chooses which tabs show (fields of hidden tabs keep their values).
    ``only`` (field names, run-level or per concept) shows just those fields, e.g. the
    class-image part of the configuration; the others keep their values, tabs left empty are
    dropped, and concepts can then be edited but not added or removed.
    """

    def __init__(self, config: DreamBoothConfig | None = None, *,
                 device: DeviceInfo | None = None, tabs: Iterable[str] = TABS,
                 params_path: str | os.PathLike = "params.json", check_paths: bool = True,
                 show_train: bool = True, preset: str | None = None,
                 only: Iterable[str] | None = None) -> None:
        self.device = device or detect_device()
        self.only = frozenset(only) if only is not None else None
        self.check_paths = check_paths
        self.fields: dict[str, FieldControl] = {
            name: make_control(spec) for name, spec in RUN_SPECS.items() if name != CONCEPTS_FIELD}
        self.concepts: list[ConceptEditor] = []
        self._problems: list[Problem] = []
        self._quiet = False  # True while many controls change at once
        self._busy = False
        self._train_callbacks: list[Callable[[DreamBoothConfig], None]] = []

        for control in self.fields.values():
            control.observe(self.refresh)
        self._family: str | None = None  # SD or SDXL, as the base model says
        for name in ("pretrained_model_name_or_path", "src"):
            self.fields[name].observe(self._base_model_changed)

        self.header = w.HTML(runtime_banner(self.device, preset))
        self.params_file = ParamsFile(params_path, read=lambda: self.config, show=self.set_config)
        # The bar's widgets, under the names the notebooks and tests use.
        self.params_path, self.params_status = self.params_file.path, self.params_file.status
        self.load_button, self.save_button = (self.params_file.load_button,
                                              self.params_file.save_button)
        # Concepts
        self.concepts_message = w.HTML()
        self.concepts_box = w.Accordion()
        self.add_concept_button = w.Button(description="Add concept", icon="plus")
        self.add_concept_button.on_click(lambda _b: self.add_concept())
        # Train
        self.train_button = w.Button(description="Train", icon="play", button_style="success",
                                     disabled=True)
        self.train_button.on_click(lambda _b: self._on_train())
        self.summary = w.HTML()

        self.tab_names = [t for t in TABS if t in set(tabs) and self._tab_has_fields(t)]
        self.tabs = w.Tab(children=[self._tab_content(t) for t in self.tab_names])
        set_titles(self.tabs, self.tab_names)
        bottom = [self.summary] + ([self.train_button] if show_train else [])
        self.widget = w.VBox([
            self.header,
            self.params_file.row, self.params_status, self.tabs, *bottom])
        self.set_config(config if config is not None else DreamBoothConfig())

    # ------------------------------------------------------------------------ layout
    def _shown_fields(self, tab: str) -> list[FieldControl]:
        return [c for c in self.fields.values()
                if c.spec.setting.tab == tab
                and (self.only is None or c.name in self.only)]

    def _tab_has_fields(self, tab: str) -> bool:
        if self.only is None:
            return True
        return bool(self._shown_fields(tab)) or (
            tab == "Concepts" and any(name in self.only for name in CONCEPT_SPECS))

    def _tab_content(self, tab: str) -> w.Widget:
        controls = [c.widget for c in self._shown_fields(tab)]
        if tab == "Concepts":
            controls += [self.concepts_message, self.concepts_box]
            if self.only is None:
                controls.append(self.add_concept_button)
        return w.VBox(controls, layout=w.Layout(width="100%"))

    def shows(self, where: str) -> bool:
        """True when the field a problem names (``Problem.where``) is shown in this form."""
        match = _CONCEPT_WHERE.match(where)
        name = match[2] if match else where
        if match and name is None:
            return True  # a problem of a whole concept
        return self.only is None or name in self.only

    # ------------------------------------------------------------------------ values
    @property
    def config(self) -> DreamBoothConfig:
        """A fresh configuration built from the widgets.

        Raises :class:`ConfigError` when a box holds text that is not a value of its field (a
        word in a number box); validation problems do not raise (see :attr:`problems`).
        """
        config, parse_problems = self._read()
        if parse_problems:
            raise ConfigError(parse_problems)
        return config

    def set_config(self, config: DreamBoothConfig) -> None:
        """Show ``config`` in the widgets (concept blocks added or removed to match)."""
        self._quiet = True
        try:
            for name, control in self.fields.items():
                control.set(getattr(config, name))
            concepts = list(config.concepts_list)
            while len(self.concepts) > len(concepts):
                self.concepts.pop()
            while len(self.concepts) < len(concepts):
                self.concepts.append(self._new_editor())
            for editor, concept in zip(self.concepts, concepts):
                editor.set(concept)
            self._layout_concepts()
            if self.concepts and self.concepts_box.selected_index is None:
                self.concepts_box.selected_index = 0  # show the first concept open
        finally:
            self._quiet = False
        self._family = detect_family(config.base_model)
        self.refresh()

    def _base_model_changed(self) -> None:
        """A base model of another family (SD 1.x/2.x, SDXL) brings its own resolution (512,
        1024) when Resolution is still the old family's; a resolution the user chose stays."""
        if self._quiet:
            return
        config = self._read()[0]
        family = detect_family(config.base_model)
        if self._family is not None and family != self._family \
                and config.resolution == FAMILY[self._family].resolution:
            self.fields["resolution"].set(FAMILY[family].resolution)
        self._family = family

    @property
    def problems(self) -> list[Problem]:
        """Every problem of the configuration as now typed (parse errors and validation)."""
        return list(self._problems)

    @property
    def busy(self) -> bool:
        """True while a run started from this form trains (the Train button stays disabled)."""
        return self._busy

    @busy.setter
    def busy(self, value: bool) -> None:
        self._busy = value
        self._update_train_button()

    # ------------------------------------------------------------------------ concepts
    def add_concept(self, concept: Concept | None = None) -> ConceptEditor:
        """Append a concept block (blank, or showing ``concept``) and open it."""
        editor = self._new_editor()
        self._quiet = True
        try:
            editor.set(concept if concept is not None else Concept())
        finally:
            self._quiet = False
        self.concepts.append(editor)
        self._layout_concepts()
        self.concepts_box.selected_index = len(self.concepts) - 1
        self.refresh()
        return editor

    def remove_concept(self, index: int) -> None:
        """Remove the concept block at ``index`` (0-based)."""
        del self.concepts[index]
        self._layout_concepts()
        self.refresh()

    def _new_editor(self) -> ConceptEditor:
        editor = ConceptEditor(self.only)
        for control in editor.fields.values():
            control.observe(self.refresh)
        editor.remove_button.on_click(
            lambda _b: self.remove_concept(self.concepts.index(editor)))
        return editor

    def _layout_concepts(self) -> None:
        self.concepts_box.children = [e.widget for e in self.concepts]
        self._update_concept_titles()

    def _update_concept_titles(self) -> None:
        titles = []
        for number, editor in enumerate(self.concepts, start=1):
            prompt = editor.fields["instance_prompt"].input.value.strip() or "no instance prompt"
            count = sum(len(c.shown) for c in editor.fields.values() if self.shows(c.name)) \
                + bool(editor.message.value)
            flag = f" \u26a0 {count}" if count else ""
            titles.append(f"Concept {number}: {prompt}{flag}")
        set_titles(self.concepts_box, titles)

    # ------------------------------------------------------------------------ validation
    def refresh(self) -> list[Problem]:
        """Re-read every widget, re-validate, and show each problem next to its field."""
        if self._quiet:
            return self.problems
        config, parse_problems = self._read()
        unparsed = {p.where for p in parse_problems}
        # A box that cannot be parsed is validated as its default: say only the parse error.
        checked = [p for p in validate(config, self.device, check_paths=self.check_paths)
                   if p.where not in unparsed]
        self._problems = parse_problems + checked
        self._show(self._problems)
        self._show_applicable(config)
        return self.problems

    def _show_applicable(self, config: DreamBoothConfig) -> None:
        """Hide the fields that do not apply to the values now chosen (a Lora Type's own
        fields); hidden fields keep their values."""
        values = {name: getattr(config, name) for name in self.fields}
        for control in self.fields.values():
            if control.spec.setting.shown_when:
                shown = is_shown(control.spec.setting, values)
                control.widget.layout.display = None if shown else "none"

    def _read(self) -> tuple[DreamBoothConfig, list[Problem]]:
        values, problems = read_controls(self.fields, RUN_SPECS, "")
        concepts = []
        for number, editor in enumerate(self.concepts, start=1):
            concept_values, concept_problems = editor.read(f"concept {number} ")
            concepts.append(Concept(**concept_values))
            problems += concept_problems
        return DreamBoothConfig(**values, concepts_list=concepts), problems

    def _show(self, problems: list[Problem]) -> None:
        by_field: dict[str, list[str]] = {}
        concept_general: dict[int, list[str]] = {}
        general: list[str] = []
        for p in problems:
            match = _CONCEPT_WHERE.match(p.where)
            if match and int(match[1]) <= len(self.concepts):
                index, name = int(match[1]) - 1, match[2]
                if name in CONCEPT_SPECS:
                    by_field.setdefault(f"{index}:{name}", []).append(p.message)
                else:
                    concept_general.setdefault(index, []).append(p.message)
            elif p.where in self.fields:
                by_field.setdefault(p.where, []).append(p.message)
            else:
                general.append(f"{p.where}: {p.message}")
        for name, control in self.fields.items():
            control.show(by_field.get(name, []))
        for index, editor in enumerate(self.concepts):
            for name, control in editor.fields.items():
                control.show(by_field.get(f"{index}:{name}", []))
            editor.message.value = _red_lines(concept_general.get(index, []))
        self.concepts_message.value = _red_lines(
            [g.split(": ", 1)[1] for g in general if g.startswith(CONCEPTS_FIELD)])
        self._update_concept_titles()
        self._update_tab_titles()
        self._update_summary(problems)
        self._update_train_button()

    def _update_tab_titles(self) -> None:
        counts = dict.fromkeys(self.tab_names, 0)
        for control in self.fields.values():
            tab = control.spec.setting.tab
            if tab in counts and self.shows(control.name):
                counts[tab] += len(control.shown)
        if "Concepts" in counts:
            counts["Concepts"] += sum(len(c.shown) for e in self.concepts
                                      for c in e.fields.values() if self.shows(c.name))
            counts["Concepts"] += sum(1 for e in self.concepts if e.message.value)
            counts["Concepts"] += bool(self.concepts_message.value)
        set_titles(self.tabs, [f"{t} \u26a0 {counts[t]}" if counts[t] else t
                               for t in self.tab_names])

    def _update_summary(self, problems: list[Problem]) -> None:
        if not problems:
            ready = "ready to train" if self.only is None else "these settings are ready"
            self.summary.value = ("<span style='color:#2e7d32'>&#10004; No problems found: "
                                  f"{ready}.</span>")
            return
        items = "".join(f"<li>{html.escape(self.describe(p))}</li>" for p in problems)
        self.summary.value = (f"<div style='color:#c62828'><b>{len(problems)} problem(s) to fix "
                              f"before training:</b><ul style='margin:2px 0'>{items}</ul></div>")

    def _update_train_button(self) -> None:
        self.train_button.disabled = bool(self._problems) or self._busy

    def describe(self, problem: Problem) -> str:
        """A problem with the field's label instead of its JSON key."""
        match = _CONCEPT_WHERE.match(problem.where)
        if match and match[2] in CONCEPT_SPECS:
            label = f"Concept {match[1]} \u00b7 {CONCEPT_SPECS[match[2]].setting.label}"
        elif match:
            label = f"Concept {match[1]}"
        elif problem.where in RUN_SPECS:
            label = RUN_SPECS[problem.where].setting.label
        else:
            label = problem.where
        return f"{label}: {problem.message}"

    # ------------------------------------------------------------------------ params JSON
    def load_params(self, path: str | os.PathLike | None = None) -> DreamBoothConfig:
        """Read a parameters JSON (ours or the extension's) into the form and return it.

        Raises :class:`ConfigError` naming every unknown key or wrong type.
        """
        return self.params_file.load(path)

    def save_params(self, path: str | os.PathLike | None = None) -> Path:
        """Write the form's configuration to a parameters JSON (atomically); return its path.

        Raises :class:`ConfigError` when a box cannot be parsed; validation problems do not.
        """
        return self.params_file.save(path)

    # ------------------------------------------------------------------------ training
    def on_train(self, callback: Callable[[DreamBoothConfig], None]) -> None:
        """Call ``callback(config)`` when Train is clicked and the configuration is valid."""
        self._train_callbacks.append(callback)

    def _on_train(self) -> None:
        if self.refresh() or self._busy:  # folders may have changed since the last edit
            return
        config = self.config
        for callback in self._train_callbacks:
            callback(config)


def _red_lines(messages: list[str]) -> str:
    if not messages:
        return ""
    lines = "<br>".join(f"&#9888; {html.escape(m)}" for m in messages)
    return f"<div style='color:#c62828; max-width:{INPUT_WIDTH}'>{lines}</div>"
