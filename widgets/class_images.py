"""Notebook 02's panel: the class-image settings, a Generate button, progress and a grid.

The settings are the class-image part of the configuration form (:class:`ConfigForm` with
``only=``), so labels, help, limits and validation are the same as in notebook 03. Generating
calls :func:`colab_dreambooth.generation.class_images.generate_class_images`, which keeps every
valid image already in a class folder and makes only the missing ones.
"""

from __future__ import annotations

import functools
import html
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import ipywidgets as w

from colab_dreambooth.config.params import resolve_concepts, save_params
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.data.images import check_images
from colab_dreambooth.errors import ConfigError, Problem
from colab_dreambooth.files import list_image_files
from colab_dreambooth.generation.class_images import ClassImageReport, generate_class_images
from colab_dreambooth.runtime.device import DeviceInfo

from .compat import set_help
from .form import ConfigForm
from .jobs import INTERRUPT_HINT, Job, jobs_in_foreground
from .plot import png_bytes
from .prepare import captioned_grid

# What generating class images reads: the base model, the size and batch, and per concept its
# class prompt, folder, count and generation settings.
CLASS_IMAGE_FIELDS = frozenset({
    "pretrained_model_name_or_path", "resolution", "sample_batch_size", "use_cpu",
    "mixed_precision", "class_prompt", "class_data_dir", "num_class_images",
    "class_negative_prompt", "class_guidance_scale", "class_infer_steps", "class_seed"})
GRID_IMAGES = 12  # class images shown after a run: enough to judge them, small to send


@dataclass
class ClassImageCount:
    """How many class images a concept wants and how many valid ones its folder holds."""

    concept: int  # 0-based
    folder: Path
    wanted: int
    existing: int

    @property
    def missing(self) -> int:
        """Images still to generate."""
        return max(0, self.wanted - self.existing)


def count_class_images(config: DreamBoothConfig) -> list[ClassImageCount]:
    """Per concept with prior preservation: its class folder, wanted and valid existing images
    (what :func:`generate_class_images` will count; no model is loaded)."""
    config = resolve_concepts(config)
    counts = []
    for index, concept in enumerate(config.concepts_list):
        if not concept.class_prompt.strip() or concept.num_class_images <= 0:
            continue
        folder = config.class_dir(index)
        existing = len(check_images(folder, config.resolution)[0]) if folder.is_dir() else 0
        counts.append(ClassImageCount(index, folder, concept.num_class_images, existing))
    return counts


class ClassImagesApp:
    """Edit the class-image settings, generate the missing images, look at them.

    Before generating, the configuration is saved to ``params_path`` so notebook 03 trains with
    exactly these settings and folders.
    """

    def __init__(self, config: DreamBoothConfig, *, params_path: str | os.PathLike,
                 device: DeviceInfo | None = None) -> None:
        self.params_path = Path(params_path)
        self.form = ConfigForm(config, device=device, params_path=params_path, show_train=False,
                               only=CLASS_IMAGE_FIELDS)
        self.form.tabs.selected_index = self.form.tab_names.index("Concepts")  # the point
        self.counts = w.HTML()
        self.generate_button = w.Button(description="Generate class images", icon="play",
                                        button_style="success", layout=w.Layout(width="220px"))
        self.stop_button = set_help(
            w.Button(description="Stop", icon="stop", button_style="danger", disabled=True),
            "Stop after the current batch; the images made so far are kept")
        self.progress = w.IntProgress(value=0, min=0, max=1, description="Generated",
                                      bar_style="info", style={"description_width": "initial"},
                                      layout=w.Layout(width="520px"))
        self.status = w.HTML()
        self.grid = w.Image(format="png", layout=w.Layout(display="none", max_width="960px"))
        self.widget = w.VBox([self.form.widget, self.counts,
                              w.HBox([self.generate_button, self.stop_button]), self.progress,
                              self.status, self.grid])
        self.reports: list[ClassImageReport] = []
        self.error: BaseException | None = None
        self.job = Job("class-images")
        self.stop_event = threading.Event()
        self.generate_button.on_click(lambda _b: self._on_generate())
        self.stop_button.on_click(lambda _b: self.stop())
        for control in self._count_controls():
            control.observe(self.update_counts)
        self.update_counts()

    def _count_controls(self):
        """The controls whose value changes the counts (each change re-reads the folders)."""
        yield self.form.fields["resolution"]
        for editor in self.form.concepts:
            yield from (editor.fields[n] for n in ("class_prompt", "class_data_dir",
                                                   "num_class_images"))

    # ------------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        """True while a background run generates."""
        return self.job.in_background

    @property
    def problems(self) -> list[Problem]:
        """The problems of the shown settings (those elsewhere belong to other notebooks)."""
        return [p for p in self.form.problems if self.form.shows(p.where)]

    def update_counts(self) -> list[ClassImageCount]:
        """Show, per concept, how many class images there are and how many are missing."""
        try:
            counts = count_class_images(self.form.config)
        except (ConfigError, OSError, ValueError) as exc:  # shown by the form as well
            self.counts.value = f"<span style='color:#c62828'>{html.escape(str(exc))}</span>"
            self.generate_button.disabled = True
            return []
        if not counts:
            self.counts.value = ("<i>No concept asks for class images (set a Class prompt and "
                                 "Total Number of Class/Reg Images), so there is nothing to "
                                 "generate: training runs without prior preservation.</i>")
        else:
            self.counts.value = "<br>".join(
                f"Concept {c.concept + 1}: <b>{c.existing}</b> of {c.wanted} class images in "
                f"<code>{html.escape(str(c.folder))}</code>"
                + (f", <b>{c.missing} to generate</b>" if c.missing else ", complete")
                for c in counts)
        self.generate_button.disabled = self.running or bool(self.problems)
        return counts

    # ------------------------------------------------------------------------ running
    def generate(self, *, background: bool = True) -> list[ClassImageReport] | None:
        """Save the parameters and generate the missing class images.

        Raises :class:`ConfigError` when a shown setting has a problem. In the foreground (an
        unattended run) a text progress bar is printed, the reports returned and any error
        raised; in the background the widgets follow the run (see :meth:`wait`).
        """
        if self.running:
            raise RuntimeError("class images are already being generated: stop or wait first")
        problems = [p for p in self.form.refresh() if self.form.shows(p.where)]
        if problems:
            raise ConfigError(problems)
        config = self.form.config
        save_params(config, self.params_path)
        counts = self.update_counts()
        self.stop_event = threading.Event()
        self.reports, self.error = [], None
        self.progress.max = max(1, sum(c.missing for c in counts))
        self.progress.value = 0
        self.progress.bar_style = "info"
        self.generate_button.disabled = True
        self.stop_button.disabled = False
        self.status.value = "Loading the base model..." if self.progress.max else ""
        if background:
            self.job.start(functools.partial(self._work, config, False), background=True)
            return None
        self.stop_button.disabled = True  # no click reaches a busy kernel: interrupting stops
        self.status.value = html.escape(INTERRUPT_HINT) + "; the images made are kept."
        self.job.start(functools.partial(self._work, config, True), background=False)
        if self.error is not None:
            raise self.error
        return self.reports

    def _on_generate(self) -> None:
        """The Generate button: in the background, or on Colab in the kernel's thread (see
        :mod:`widgets.jobs`); problems and errors show in the panel."""
        try:
            self.generate(background=not jobs_in_foreground())
        except Exception as exc:  # a callback has no cell to fail in
            if self.error is None:  # a setting's problem: the run never started
                self.status.value = (f"<span style='color:#c62828'>"
                                     f"{html.escape(str(exc))}</span>")

    def stop(self) -> None:
        """Stop after the current batch; the images written so far are kept."""
        self.stop_event.set()
        self.stop_button.disabled = True
        self.status.value = "Stopping after this batch..."

    def wait(self, timeout: float | None = None) -> list[ClassImageReport]:
        """Wait for a background run; return its reports (empty if it failed)."""
        self.job.wait(timeout)
        return self.reports

    def _work(self, config: DreamBoothConfig, echo: bool) -> None:
        def on_image(path: Path) -> None:
            self.progress.value += 1
            self.status.value = (f"{self.progress.value} of {self.progress.max}: "
                                 f"<code>{html.escape(path.name)}</code>")

        try:
            self.reports = generate_class_images(config, progress=echo, stop=self.stop_event,
                                                 on_image=on_image)
        except KeyboardInterrupt:  # Colab's stop: like Stop, every image written is whole
            self.stop_event.set()
        except BaseException as exc:  # shown in the panel; re-raised by a foreground run
            self.error = exc
        finally:
            self._finish(config, echo)

    def _finish(self, config: DreamBoothConfig, echo: bool) -> None:
        self.stop_button.disabled = True
        if self.error is not None:
            self.progress.bar_style = "danger"
            text = str(self.error) or type(self.error).__name__
            self.status.value = (f"<div style='color:#c62828'><b>Generating failed</b><pre>"
                                 f"{html.escape(text)}</pre></div>")
            message = f"Generating class images failed: {text}"
        else:
            stopped = self.stop_event.is_set()
            self.progress.bar_style = "warning" if stopped else "success"
            lines = [str(r) for r in self.reports] or ["No concept asks for class images."]
            if stopped:
                lines.insert(0, "Stopped: the images made so far are kept; generate again "
                                "to make the rest.")
            message = "\n".join(lines)
            self.status.value = "<br>".join(html.escape(line) for line in lines)
            self.show_grid(config)
        self.update_counts()
        if echo:
            print(message, file=sys.stderr if self.error else sys.stdout)

    # ------------------------------------------------------------------------ looking
    def grid_image(self, config: DreamBoothConfig | None = None, *, limit: int = GRID_IMAGES,
                   size: int = 128):
        """A captioned grid of class images: those the last run made, else the first of each
        class folder. None when there is none."""
        paths = [p for r in self.reports for p in r.files][:limit]
        if not paths:
            config = config or self.form.config
            for count in count_class_images(config):
                if count.folder.is_dir():
                    paths += list_image_files(count.folder)[:limit - len(paths)]
        return captioned_grid(paths, size=size, columns=6)

    def show_grid(self, config: DreamBoothConfig | None = None) -> None:
        """Show :meth:`grid_image` in the panel."""
        grid = self.grid_image(config)
        if grid is not None:
            self.grid.value = png_bytes(grid)
            self.grid.layout.display = None
