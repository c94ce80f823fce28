"""The training notebook's panel: the configuration form above the live training view."""

from __future__ import annotations

import os
from pathlib import Path

import ipywidgets as w

from colab_dreambooth.config.params import save_params
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.errors import ConfigError
from colab_dreambooth.runtime.device import DeviceInfo
from colab_dreambooth.runtime.environment import mount_drive_if_needed
from colab_dreambooth.training.train import TrainResult

from .compat import set_help
from .form import ConfigForm
from .jobs import jobs_in_foreground
from .training_view import TrainingView, saved_output


class TrainApp:
    """Edit the settings, click Train, follow the run, Stop it.

    Before each run the configuration is saved to ``params_path`` (atomically), so the next
    notebooks and a later resume read exactly what trained.
    """

    def __init__(self, config: DreamBoothConfig | None = None, *,
                 params_path: str | os.PathLike, device: DeviceInfo | None = None,
                 plot_interval: float = 1.0, resume: bool = False,
                 force: bool = False) -> None:
        self.params_path = Path(params_path)
        self.form = ConfigForm(config, device=device, params_path=params_path)
        self.view = TrainingView(plot_interval=plot_interval)
        self.resume = set_help(
            w.Checkbox(value=resume, indent=False, description="Resume from the newest checkpoint"),
            "Continue an interrupted run exactly where its last checkpoint left it (Saving tab: "
            "Checkpoint folder)")
        # For experts: the memory and disk estimates err on the safe side.
        self.force = set_help(
            w.Checkbox(value=force, indent=False,
                       description="Start even if the estimates say it will not fit"),
            "The run is otherwise refused before any model loads when its GPU memory or disk "
            "space estimate exceeds what the runtime has; the refusal names what to change")
        self.form.on_train(self._on_train)
        self.widget = w.VBox([self.form.widget, self.resume, self.force, self.view.widget])

    def train(self, config: DreamBoothConfig | None = None, *,
              background: bool = True) -> TrainResult | None:
        """Save the parameters and train (the form's configuration unless one is given).

        Raises :class:`ConfigError` listing every problem when the form holds any. In the
        foreground the result is returned (and errors raised); in the background see
        ``app.view.wait()``.
        """
        if config is None:
            problems = self.form.refresh()
            if problems:
                raise ConfigError(problems)
            config = self.form.config
        # Drive folders set in the form (checkpoints, models root) are mounted before the run.
        mount_drive_if_needed(config.models_root, config.checkpoint_dir)
        save_params(config, self.params_path)
        self.form.busy = True
        try:
            return self.view.run(config, background=background, resume=self.resume.value,
                                 force=self.force.value,
                                 on_finish=lambda _view: setattr(self.form, "busy", False))
        except RuntimeError:
            self.form.busy = self.view.running
            raise

    def _on_train(self, config: DreamBoothConfig) -> None:
        """The Train button: in the background, or on Colab in the kernel's thread (see
        :mod:`widgets.jobs`), where an error is shown in the view rather than raised."""
        if not jobs_in_foreground():
            self.train(config, background=True)
            return
        try:
            self.train(config, background=False)
        except Exception:  # the view shows it; a callback's traceback would only repeat it
            pass

    def describe_result(self) -> str:
        """Where the last run stands: still training, failed, stopped, or finished where."""
        view = self.view
        if view.running:
            return "Still training: run this cell again when the run ends (or click Stop)."
        if view.error is not None:
            return f"The run failed: {view.error}"
        if view.result is None:
            return "No run yet: click Train above."
        r = view.result
        how = "stopped early at" if r.stopped_early else "finished"
        return (f"Training {how} step {r.steps} of {r.total_steps} (seed {r.seed}).\n"
                f"Saved model: {saved_output(r)}\nParameters: {self.params_path}")
