"""Notebook 04's panel: sample the trained model, then export, describe and send it.

The release choices are :class:`colab_dreambooth.publish.release.ReleaseSettings`, whose fields
carry their labels, help and limits as the configuration's do, so this form is generated the same
way (:func:`widgets.controls.make_control`). The work itself is
:func:`colab_dreambooth.publish.release.sample_model` and
:func:`~colab_dreambooth.publish.release.make_release`.
"""

from __future__ import annotations

import html
import sys
from pathlib import Path
from typing import Any, Callable

import ipywidgets as w

from colab_dreambooth.config.fields import field_specs
from colab_dreambooth.config.settings import DreamBoothConfig, safe_name
from colab_dreambooth.publish.release import (
    ReleaseResult,
    ReleaseSettings,
    check_release,
    make_release,
    release_folder,
    sample_model,
)

from .compat import set_help
from .controls import FieldControl, make_control
from .form import read_controls
from .jobs import Job, jobs_in_foreground
from .plot import png_bytes

RELEASE_SPECS = field_specs(ReleaseSettings)


class ReleaseApp:
    """Samples of the trained model, and the export / model card / dehydrate / send form.

    ``sample()`` and ``release()`` run in the cell (unattended) or, from the buttons, in a
    background thread so the notebook stays responsive; each shows its outcome in the panel.
    """

    def __init__(self, config: DreamBoothConfig, settings: ReleaseSettings | None = None,
                 *, sample_prompt: str = "") -> None:
        self.config = config
        self.pipe = None  # loaded once, on the first sample run
        self.samples = None  # the last SampleResult
        self.result: ReleaseResult | None = None
        self.error: BaseException | None = None
        self.job = Job("release")
        self.fields: dict[str, FieldControl] = {n: make_control(s)
                                                for n, s in RELEASE_SPECS.items()}
        for control in self.fields.values():
            control.observe(self.refresh)
        self.fields["export_name"].input.placeholder = f"blank = {safe_name(config.model_name)}"
        self.fields["destination"].input.placeholder = ("blank = keep it here; a folder, or "
                                                        "hf://<user>/<repo>")

        model = config.model_dir / "model"
        found = (model / "model_index.json").is_file()
        self.header = w.HTML(
            f"<b>Trained model</b>: <code>{html.escape(str(model))}</code> "
            + ("<span style='color:#2e7d32'>&#10004; found</span>" if found else
               "<span style='color:#c62828'>not found: train it first (notebook 03)</span>"))
        self.prompt = set_help(
            w.Text(value=sample_prompt, description="Sample prompt",
                   placeholder="blank = each concept's Sample Image Prompt",
                   style={"description_width": "260px"}, layout=w.Layout(width="640px")),
            "Prompt to sample; blank samples every concept with its own sample settings")
        self.sample_button = w.Button(description="Generate samples", icon="image")
        self.sample_status = w.HTML()
        self.grid = w.Image(format="png", layout=w.Layout(display="none", max_width="960px"))
        self.release_button = w.Button(description="Export and send", icon="upload",
                                       button_style="success", layout=w.Layout(width="220px"))
        self.message = w.HTML()
        self.status = w.HTML()
        self.sample_button.on_click(lambda _b: self._run_job(self.sample))
        self.release_button.on_click(lambda _b: self._run_job(self.release))
        self.widget = w.VBox([
            self.header,
            w.HTML("<h4 style='margin:8px 0 2px'>Samples</h4>"),
            w.HBox([self.prompt, self.sample_button]), self.sample_status, self.grid,
            w.HTML("<h4 style='margin:8px 0 2px'>Export, model card, dehydrate, extract a LoRA, send</h4>"),
            *[c.widget for c in self.fields.values()],
            self.message, self.release_button, self.status])
        if settings is not None:
            self.set_settings(settings)
        self.refresh()

    # ------------------------------------------------------------------------ settings
    @property
    def settings(self) -> ReleaseSettings:
        """The settings as now shown; ValueError names a box that cannot be read."""
        values, problems = read_controls(self.fields, RELEASE_SPECS, "")
        if problems:
            raise ValueError("; ".join(str(p) for p in problems))
        return ReleaseSettings(**values)

    def set_settings(self, settings: ReleaseSettings) -> None:
        """Show ``settings`` in the form."""
        for name, control in self.fields.items():
            control.set(getattr(settings, name))

    def refresh(self) -> list[str]:
        """Check the settings; show the problems and enable Export only without any."""
        try:
            problems = check_release(self.settings)
        except ValueError as exc:
            problems = [str(exc)]
        self.message.value = "".join(
            f"<div style='color:#c62828'>&#9888; {html.escape(p)}</div>" for p in problems)
        self.release_button.disabled = bool(problems) or self.running
        return problems

    @property
    def running(self) -> bool:
        """True while a button's work runs in the background."""
        return self.job.in_background

    # ------------------------------------------------------------------------ work
    def sample(self, *, progress: bool = True):
        """Generate samples (the prompt box, or each concept's sample settings); show the grid
        and return the :class:`~colab_dreambooth.generation.sample.SampleResult`."""
        from colab_dreambooth.models.pipelines import load_pipeline

        self.sample_status.value = "Loading the model and sampling..."
        if self.pipe is None:
            from colab_dreambooth.publish.release import trained_model

            self.pipe = load_pipeline(trained_model(self.config),
                                      "cpu" if self.config.use_cpu else None)
        self.samples = sample_model(self.config, self.prompt.value, pipe=self.pipe,
                                    progress=progress)
        self.grid.value = png_bytes(self.samples.grid)
        self.grid.layout.display = None
        self.sample_status.value = (f"{len(self.samples.paths)} sample(s), grid saved as "
                                    f"<code>{html.escape(str(self.samples.grid_path))}</code>")
        return self.samples

    def release(self, *, progress: bool = True) -> ReleaseResult:
        """Export, write the card (with the last samples), dehydrate and send, as set."""
        settings = self.settings
        grid = self.samples.grid if self.samples is not None else None
        self.release_button.disabled = True
        lines: list[str] = []

        def status(line: str) -> None:
            lines.append(line)
            self.status.value = "<br>".join(html.escape(x) for x in lines[-8:])

        try:
            self.result = make_release(self.config, settings, grid=grid, progress=progress,
                                       on_status=status)
        finally:
            self.refresh()
        self.status.value = (f"<b style='color:#2e7d32'>Done.</b><pre style='margin:0'>"
                             f"{html.escape(str(self.result))}</pre>")
        return self.result

    def _run_job(self, work: Callable[..., Any]) -> None:
        if self.running:
            return
        self.error = None

        def run() -> None:
            try:
                work(progress=False)
            except KeyboardInterrupt:  # Colab's stop, in the kernel's thread
                self.status.value = ("<b>Interrupted</b>: files already written are whole; "
                                     "click again to redo it")
            except BaseException as exc:  # shown in the panel: a thread has no cell to fail
                self.error = exc
                self.status.value = (f"<div style='color:#c62828'><b>Failed</b><pre>"
                                     f"{html.escape(str(exc) or type(exc).__name__)}</pre></div>")
                print(f"Failed: {exc}", file=sys.stderr)

        # See widgets.jobs: Colab redraws only what the kernel's own thread changes.
        self.job.start(run, background=not jobs_in_foreground())

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a button's background work to end."""
        self.job.wait(timeout)

    @property
    def folder(self) -> Path:
        """Where the release files are written."""
        return release_folder(self.config)
