"""The live training view: progress, loss curve, latest preview grid, log, and a Stop button.

``view.run(config, background=True)`` trains in a thread so the notebook stays responsive and
Stop can be clicked; ``background=False`` trains in the cell itself (unattended runs with
papermill/nbclient), re-raising any error. Stop sets a :class:`threading.Event` that
:func:`colab_dreambooth.training.train.train` checks after every step: the run then saves the model
trained so far and returns with ``stopped_early=True``.
"""

from __future__ import annotations

import collections
import functools
import html
import logging
import math
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import ipywidgets as w

from colab_dreambooth.config.params import resolve_concepts
from colab_dreambooth.config.presets import resolve_auto
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.files import list_image_files
from colab_dreambooth.models.families import detect_family
from colab_dreambooth.runtime.device import DeviceInfo
from colab_dreambooth.training.optim import plan_steps
from colab_dreambooth.training.train import TrainResult, train

from .compat import set_help
from .jobs import INTERRUPT_HINT, Job
from .plot import loss_curve, png_bytes

StepCallback = Callable[[int, float, float], None]


class TrainingView:
    """Widgets that follow one training run at a time."""

    def __init__(self, *, plot_interval: float = 1.0, log_lines: int = 12,
                 plot_size: tuple[int, int] = (480, 200)) -> None:
        self.plot_interval = plot_interval
        self.plot_size = plot_size
        self.progress = w.IntProgress(value=0, min=0, max=1, description="Training",
                                      bar_style="info", layout=w.Layout(width="640px"))
        self.label = w.HTML("Not started.")
        self.loss_image = w.Image(format="png", layout=w.Layout(width=f"{plot_size[0]}px"))
        self.preview = w.Image(format="png", layout=w.Layout(display="none", max_width="640px"))
        self.preview_caption = w.HTML()
        self.stop_button = set_help(
            w.Button(description="Stop", icon="stop", button_style="danger", disabled=True),
            "End the run after the current step and save the model trained so far")
        self.stop_button.on_click(lambda _b: self.stop())
        self.status = w.HTML()
        self.log = w.HTML()
        self.widget = w.VBox([w.HBox([self.progress, self.stop_button]), self.label,
                              self.loss_image, self.preview_caption, self.preview, self.status,
                              self.log])
        self.stop_event = threading.Event()
        self.losses: list[float] = []
        self.result: TrainResult | None = None
        self.error: BaseException | None = None
        self.job = Job("dreambooth-training")
        self._log_lines: collections.deque[str] = collections.deque(maxlen=log_lines)
        self._started = 0.0
        self._last_plot = 0.0
        self._preview_path: Path | None = None
        self.loss_image.value = png_bytes(loss_curve([], plot_size))

    @property
    def running(self) -> bool:
        """True while a run is going."""
        return self.job.running

    # ------------------------------------------------------------------------ control
    def run(self, config: DreamBoothConfig, *, background: bool = True,
            device: DeviceInfo | None = None, on_step: StepCallback | None = None,
            on_finish: Callable[["TrainingView"], None] | None = None,
            resume: bool = False, force: bool = False) -> TrainResult | None:
        """Train ``config`` and follow it in the view (``resume``: continue from the newest
        checkpoint; ``force``: start even when the memory or disk estimate says it will not
        fit; see :func:`colab_dreambooth.training.train.train`).

        In the background (the default) this returns at once; :meth:`wait` gives the result.
        In the foreground it returns the :class:`TrainResult` and raises whatever training
        raised. ``on_step(step, loss, lr)`` is called after the view's own update;
        ``on_finish(view)`` once the run ends, however it ends.
        """
        if self.running:
            raise RuntimeError("a training run is already going: stop it or wait for it first")
        self._reset(config, device)
        work = functools.partial(self._work, config, device, on_step, on_finish, resume,
                                 echo=not background, force=force)
        if background:
            self.job.start(work, background=True)
            return None
        self.stop_button.disabled = True  # no click reaches a busy kernel: interrupting stops
        self.status.value = html.escape(INTERRUPT_HINT) + (
            "; the current step finishes, then a checkpoint and the model are saved.")
        self.job.start(work, background=False)
        if self.error is not None:
            raise self.error
        return self.result

    def stop(self) -> None:
        """Ask the run to end after the current step; the model trained so far is saved."""
        self.stop_event.set()
        self.stop_button.disabled = True
        self.stop_button.description = "Stopping..."
        self.status.value = "Stopping after this step; saving the model trained so far..."

    def wait(self, timeout: float | None = None) -> TrainResult | None:
        """Wait for a background run to end; return its result (None if it failed)."""
        self.job.wait(timeout)
        return self.result

    # ------------------------------------------------------------------------ the run
    def _reset(self, config: DreamBoothConfig, device: DeviceInfo | None) -> None:
        self.stop_event = threading.Event()
        self.losses, self.result, self.error = [], None, None
        self._log_lines.clear()
        self.log.value = ""
        self._started = self._first_step = time.time()
        self._last_plot = 0.0
        self._preview_path = None
        self._model_dir = config.model_dir
        self.total_steps = estimate_total_steps(config, device)
        self.progress.max = max(1, self.total_steps or 1)
        self.progress.value = 0
        self.progress.bar_style = "info"
        self.stop_button.disabled = False
        self.stop_button.description = "Stop"
        self.label.value = "Checking the data and loading the model..."
        self.status.value = ""
        self.preview.layout.display = "none"
        self.preview_caption.value = ""
        self.loss_image.value = png_bytes(loss_curve([], self.plot_size))

    def _work(self, config: DreamBoothConfig, device: DeviceInfo | None,
              on_step: StepCallback | None, on_finish: Callable | None, resume: bool, *,
              echo: bool, force: bool = False) -> None:
        def step_callback(step: int, loss: float, lr: float) -> None:
            try:
                self._on_step(step, loss, lr)
            except Exception as exc:  # a display glitch must never end (and lose) the run
                self._append_log(f"WARNING the view could not update: {exc!r}")
            if on_step is not None:
                on_step(step, loss, lr)

        handler = _LogToView(self, echo)
        logger = logging.getLogger("colab_dreambooth")
        old_level = logger.level
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        try:
            self.result = train(config, device=device, stop=self.stop_event, progress=False,
                                on_step=step_callback, resume=resume, force=force)
        except BaseException as exc:  # shown in the view; re-raised by a foreground run
            self.error = exc
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
            try:
                self._finish(echo)
            finally:
                if on_finish is not None:
                    on_finish(self)

    def _on_step(self, step: int, loss: float, lr: float) -> None:
        self.losses.append(loss)
        if step > self.progress.max:  # the estimate missed (unusable images, several GPUs)
            self.progress.max = step
        self.progress.value = step
        now = time.time()
        if step == 1:
            self._first_step = now  # loading and latent caching are not steps: time from here
        speed = ""
        if step > 1 and now > self._first_step:
            per_step = (now - self._first_step) / (step - 1)
            remaining = (self.progress.max - step) * per_step
            speed = f" &nbsp; {per_step:.2f} s/step &nbsp; about {_duration(remaining)} left"
        self.label.value = (f"step <b>{step}</b> / {self.progress.max} &nbsp; loss "
                            f"<b>{loss:.4f}</b> &nbsp; lr {lr:.2e}{speed}")
        if now - self._last_plot >= self.plot_interval:  # drawing every step would slow it
            self._last_plot = now
            self._draw()

    def _draw(self) -> None:
        self.loss_image.value = png_bytes(loss_curve(self.losses, self.plot_size,
                                                     total_steps=self.progress.max))
        self._show_latest_preview()

    def _show_latest_preview(self) -> None:
        grids = [p for p in (self._model_dir / "samples").glob("*-grid.png")
                 if p.stat().st_mtime >= self._started - 1]  # not a grid of an older run
        if not grids:
            return
        latest = max(grids, key=lambda p: p.stat().st_mtime)
        if latest == self._preview_path:
            return
        self._preview_path = latest
        self.preview.value = latest.read_bytes()
        self.preview.layout.display = None
        self.preview_caption.value = f"Latest preview: <code>{html.escape(str(latest))}</code>"

    def _finish(self, echo: bool) -> None:
        self._draw()
        self.stop_button.disabled = True
        self.stop_button.description = "Stop"
        result, error = self.result, self.error
        if isinstance(error, KeyboardInterrupt):  # a second interrupt, or one while loading
            self.progress.bar_style = "danger"
            message = ("Interrupted at once: nothing more was saved; the last checkpoint (if "
                       "any) is intact, so training again with Resume on continues from it")
            self.status.value = f"<b>{html.escape(message)}</b>"
        elif error is not None:
            self.progress.bar_style = "danger"
            text = str(error) or type(error).__name__
            self.status.value = (f"<div style='color:#c62828'><b>Training failed</b><pre>"
                                 f"{html.escape(text)}</pre></div>")
            message = f"Training failed: {text}"
        elif result is not None and result.stopped_early:
            self.progress.bar_style = "warning"
            message = (f"Stopped at step {result.steps} of {result.total_steps}: the model "
                       f"trained so far is saved in {saved_output(result)}")
            if result.checkpoint is not None:
                message += (f". To continue from step {result.steps}: train again with Resume "
                            f"on (notebook 03: RESUME = True); checkpoint {result.checkpoint}")
            self.status.value = f"<b>{html.escape(message)}</b>"
        else:
            self.progress.bar_style = "success"
            steps = result.steps if result else self.progress.value
            message = f"Finished {steps} steps: the model is saved in " + (
                str(saved_output(result)) if result else "?")
            self.status.value = f"<b>{html.escape(message)}</b>"
        if echo:
            print(message, file=sys.stderr if error else sys.stdout)

    def _append_log(self, line: str) -> None:
        self._log_lines.append(line)
        text = html.escape("\n".join(self._log_lines))
        self.log.value = f"<pre style='font-size:11px; margin:0'>{text}</pre>"


class _LogToView(logging.Handler):
    """Shows the package's log lines (seed, data warnings, previews) in the view."""

    def __init__(self, view: TrainingView, echo: bool):
        super().__init__(logging.INFO)
        self.view, self.echo = view, echo
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        self.view._append_log(line)
        if self.echo:  # foreground runs keep the log in the notebook's text output too
            print(line, file=sys.stderr)


def saved_output(result: TrainResult) -> Path:
    """What the run saved: the LoRA file of a LoRA run, else the diffusers folder."""
    return getattr(result, "lora_file", None) or result.model_dir


def estimate_total_steps(config: DreamBoothConfig,
                         device: DeviceInfo | None = None) -> int | None:
    """The number of optimizer steps ``config`` will run on ``device`` (detected when None:
    a blank batch size comes from its preset), counted from its image files.

    Exact when Training Steps is set; otherwise it assumes every instance image is usable.
    None when it cannot tell (e.g. a missing concepts file: training will say why).
    """
    try:
        if config.train_batch_size is None:
            config = resolve_auto(config, device, family=detect_family(config.base_model))
        concepts = resolve_concepts(config).concepts_list
        images = 0
        for concept in concepts:
            folder = Path(concept.instance_data_dir).expanduser()
            images += len(list_image_files(folder)) if concept.instance_data_dir.strip() else 0
        batches = math.ceil(images / config.train_batch_size) if images else 1
        return plan_steps(batches, config.gradient_accumulation_steps, config.max_train_steps,
                          config.num_train_epochs).total_steps
    except Exception:  # any problem here is reported by train() itself, more precisely
        return None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
