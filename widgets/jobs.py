"""Where the notebooks' long jobs (training, class images, samples and export) run.

On Google Colab two things rule out a background thread: widgets changed from one are not
redrawn (colabtools issue 3373), and a runtime whose kernel is not busy counts as idle and is
disconnected. So there a job runs in the kernel's own thread (the cell's, or the button's
callback), updating the widgets as it goes, and Colab's interrupt (the cell's stop button,
Runtime > Interrupt execution, Ctrl+M I: a KeyboardInterrupt) is the Stop. Elsewhere a job
runs in a background thread so the notebook stays usable and the Stop button can be clicked.
:class:`Job` runs each panel's work in the thread so chosen.
"""

from __future__ import annotations

import threading
from typing import Callable

from colab_dreambooth.runtime.environment import on_colab

# Shown by a job running in the kernel's thread, where the Stop button cannot be clicked.
INTERRUPT_HINT = ("Running in this cell: stop it by interrupting the kernel (Colab: the cell's "
                  "stop button, or Runtime > Interrupt execution, Ctrl+M I)")


def jobs_in_foreground() -> bool:
    """True where a button's job must run in the kernel's own thread (Google Colab)."""
    return on_colab()


class Job:
    """One long job at a time: in a daemon thread, or in the calling (kernel's) thread.

    The panels (training, class images, release) run their work through one of these, choosing
    the thread with :func:`jobs_in_foreground`; the work itself reports to the widgets.
    """

    def __init__(self, name: str) -> None:
        self.name = name  # the thread's name, seen in tracebacks and debuggers
        self.thread: threading.Thread | None = None
        self._in_foreground = False

    @property
    def in_background(self) -> bool:
        """True while a background thread runs the job."""
        return self.thread is not None and self.thread.is_alive()

    @property
    def running(self) -> bool:
        """True while the job runs, in the background or in the calling thread."""
        return self._in_foreground or self.in_background

    def start(self, work: Callable[[], None], *, background: bool) -> None:
        """Run ``work()``: in a new daemon thread, returning at once, when ``background``; else
        right here, returning when it ends (any error it raises propagates)."""
        if background:
            self.thread = threading.Thread(target=work, name=self.name, daemon=True)
            self.thread.start()
            return
        self._in_foreground = True
        try:
            work()
        finally:
            self._in_foreground = False

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a background run to end (at most ``timeout`` seconds)."""
        if self.thread is not None:
            self.thread.join(timeout)
