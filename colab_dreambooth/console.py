"""How the package talks on a console: log lines that do not break progress bars, the
libraries' own bars hidden on request, and no warnings a user can do nothing about.

``configure_logging()`` is called by the command line; ``quiet_known_warnings()`` by the model
loading code, so notebooks get it too.
"""

from __future__ import annotations

import logging
import os
import sys

from tqdm.auto import tqdm

# Messages of other libraries that warn about something a user of this package cannot and
# need not change: transformers falls back to its PIL image processor when torchvision is
# missing (our CPU environment leaves torchvision out on purpose; pipelines never use it).
_KNOWN_NOISE = {
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
}


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_known_warnings() -> None:
    """Drop the library warnings listed in ``_KNOWN_NOISE`` (idempotent)."""
    for name, fragments in _KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(fragments))


class TqdmHandler(logging.StreamHandler):
    """Writes each record through ``tqdm.write``, so a log line never lands in the middle of
    a progress bar's line; the bar is redrawn below it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never raise
            self.handleError(record)


def configure_logging(level: int = logging.INFO) -> None:
    """Log ``levelname message`` lines to stderr through tqdm (the command line's setup).

    Like ``logging.basicConfig``, nothing changes when the root logger already has handlers
    (an application or a test harness that set up logging its own way)."""
    quiet_known_warnings()
    root = logging.getLogger()
    if root.handlers:
        return
    handler = TqdmHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)


def hide_library_progress() -> None:
    """Hide the progress bars of diffusers, transformers and the Hub client (model loading,
    downloads), as ``--no-progress`` promises; the package's own bars take a ``progress``
    argument."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            __import__(module, fromlist=["disable_progress_bar"]).disable_progress_bar()
        except (ImportError, AttributeError):  # an older or newer layout: bars stay
            pass
    try:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:
        pass


__all__ = ["configure_logging", "hide_library_progress", "quiet_known_warnings", "TqdmHandler"]
