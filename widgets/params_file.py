"""The form's Load / Save Params bar: a parameters JSON read into the form or written from it.

Ours and the AUTOMATIC1111 extension's ``db_config.json`` both load; saving is atomic
(:func:`colab_dreambooth.config.params.save_params`). What went right or wrong shows on the
status line under the bar, every problem listed, so a click never raises in the notebook.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Callable, Sequence

import ipywidgets as w

from colab_dreambooth.config.params import read_params, save_params
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.errors import ConfigError, Problem

from .compat import set_help


class ParamsFile:
    """A path box with Load and Save buttons (``row``) and a status line (``status``).

    ``read()`` gives the configuration to save (raising :class:`ConfigError` for a box that
    cannot be parsed); ``show(config)`` puts a loaded configuration in the form.
    """

    def __init__(self, path: str | os.PathLike, *, read: Callable[[], DreamBoothConfig],
                 show: Callable[[DreamBoothConfig], None]) -> None:
        self._read, self._show = read, show
        self.path = set_help(
            w.Text(value=str(path), description="Params file",
                   style={"description_width": "90px"}, layout=w.Layout(width="520px")),
            "The parameters JSON to load or save (the extension's db_config.json loads too)")
        self.load_button = w.Button(description="Load Params", icon="folder-open")
        self.save_button = w.Button(description="Save Params", icon="save")
        self.status = w.HTML()
        self.load_button.on_click(lambda _b: self._on_load())
        self.save_button.on_click(lambda _b: self._on_save())
        self.row = w.HBox([self.path, self.load_button, self.save_button])

    def load(self, path: str | os.PathLike | None = None) -> DreamBoothConfig:
        """Read a parameters JSON (ours or the extension's; the path box's when None), show it
        and return it. Raises :class:`ConfigError` naming every unknown key or wrong type."""
        path = Path(path if path is not None else self.path.value).expanduser()
        loaded = read_params(path)
        self._show(loaded.config)
        notes = [f"ignored the extension's keys: {', '.join(loaded.ignored_keys)}"] \
            if loaded.ignored_keys else []
        self._status(f"Loaded {path}", notes + loaded.notes)
        return loaded.config

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the form's configuration to a parameters JSON (atomically); return its path.

        Raises :class:`ConfigError` when a box cannot be parsed. Problems found by validation
        do not stop saving: an unfinished configuration can be saved and finished later.
        """
        path = Path(path if path is not None else self.path.value).expanduser()
        saved = save_params(self._read(), path)
        self._status(f"Saved {saved}", [])
        return saved

    def _on_load(self) -> None:
        try:
            self.load()
        except ConfigError as exc:
            self._status(f"Could not load {self.path.value}", [], exc.problems)

    def _on_save(self) -> None:
        try:
            self.save()
        except ConfigError as exc:
            self._status("Not saved: fix these boxes first", [], exc.problems)
        except OSError as exc:
            self._status(f"Could not save {self.path.value}", [str(exc)])

    def _status(self, title: str, notes: list[str], problems: Sequence[Problem] = ()) -> None:
        colour = "#c62828" if problems else "#2e7d32"
        lines = [html.escape(n) for n in notes] + [html.escape(str(p)) for p in problems]
        items = "".join(f"<li>{line}</li>" for line in lines)
        self.status.value = (f"<div style='color:{colour}'>{html.escape(title)}"
                             + (f"<ul style='margin:2px 0'>{items}</ul>" if items else "")
                             + "</div>")
