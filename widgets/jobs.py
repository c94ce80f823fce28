"""Where the notebooks' long jobs (training, class images, samples and export) run.

On Google Colab two things rule out a background thread: widgets changed from one are not
redrawn (colabtools issue 3373), and a runtime whose kernel is not busy counts as idle and is
disconnected. So there a job runs in the kernel's own thread (the cell's, or the button's
callback), updating the widgets as it goes, and Colab's interrupt (the cell's stop button,
Runtime > Interrupt execution, Ctrl+M I: a KeyboardInterrupt) is the Stop. Elsewhere a job
runs in a background thread so the notebook stays usable and the Stop button can be clicked.
"""

from __future__ import annotations

from colab_dreambooth.runtime.environment import on_colab

# Shown by a job running in the kernel's thread, where the Stop button cannot be clicked.
INTERRUPT_HINT = ("Running in this cell: stop it by interrupting the kernel (Colab: the cell's "
                  "stop button, or Runtime > Interrupt execution, Ctrl+M I)")


def jobs_in_foreground() -> bool:
    """True where a button's job must run in the kernel's own thread (Google Colab)."""
    return on_colab()
