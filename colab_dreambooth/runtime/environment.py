"""Where this run happens: the notebook service (Colab, Kaggle, Gradient or a local machine),
its default folders and Google Drive. The GPU's facts are :mod:`colab_dreambooth.runtime.device`'s.

No widgets here; the notebooks' banner (``widgets.environment``) and the
``colab-dreambooth env`` command both read this module.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

DRIVE_MOUNT = Path("/content/drive")
PLATFORM_NAMES = {"colab": "Google Colab", "kaggle": "Kaggle",
                  "gradient": "Paperspace Gradient", "local": "local machine"}
# Environment variables each service sets in its kernels (any one is enough).
COLAB_VARIABLES = ("COLAB_RELEASE_TAG", "COLAB_GPU", "COLAB_BACKEND_VERSION")
KAGGLE_VARIABLES = ("KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE", "KAGGLE_DATA_PROXY_URL")
GRADIENT_VARIABLES = ("PAPERSPACE_NOTEBOOK_REPO_ID", "PAPERSPACE_CLUSTER_ID",
                      "PAPERSPACE_NOTEBOOK_ID", "PAPERSPACE_METRIC_WORKLOAD_ID")


@dataclass(frozen=True)
class Runtime:
    """The notebook service this process runs on and the folders that suit it."""

    platform: str  # "colab", "kaggle", "gradient" or "local"
    work_dir: Path  # where data and models go by default
    drive_dir: Path | None = None  # Google Drive's MyDrive, when mounted (Colab only)

    @property
    def name(self) -> str:
        """A short human name of the service."""
        return PLATFORM_NAMES[self.platform]

    @property
    def persistent_dir(self) -> Path:
        """Where files outlive the session: Drive when mounted, else the work folder (lost
        with a Colab runtime; kept as the notebook's output on Kaggle; kept on Gradient)."""
        return self.drive_dir or self.work_dir


def detect_platform(env: Mapping[str, str] | None = None, root: Path = Path("/")) -> str:
    """"colab", "kaggle", "gradient" or "local", from the services' environment variables
    (and, for Kaggle, its /kaggle/working and /kaggle/input folders). ``env`` and ``root`` exist
    for tests.

    Kaggle and Gradient are asked first: Kaggle's image is built on Colab's, so there
    ``COLAB_RELEASE_TAG`` is set and ``google.colab`` imports too.
    """
    env = os.environ if env is None else env
    if any(env.get(v) for v in KAGGLE_VARIABLES) or (
            (root / "kaggle" / "working").is_dir() and (root / "kaggle" / "input").is_dir()):
        return "kaggle"
    if any(env.get(v) for v in GRADIENT_VARIABLES):
        return "gradient"
    if any(env.get(v) is not None for v in COLAB_VARIABLES) or (env is os.environ
                                                              and _colab_importable()):
        return "colab"
    return "local"


def detect_runtime(env: Mapping[str, str] | None = None, root: Path = Path("/"),
                   cwd: Path | None = None) -> Runtime:
    """The service, its default work folder and Drive's folder when mounted.

    Colab: /content (Drive under /content/drive/MyDrive once mounted); Kaggle: /kaggle/working;
    Gradient: /notebooks; a local machine: the current folder.
    """
    platform = detect_platform(env, root)
    if platform == "colab":
        drive = root / "content" / "drive" / "MyDrive"
        return Runtime(platform, root / "content", drive if drive.is_dir() else None)
    work = {"kaggle": root / "kaggle" / "working", "gradient": root / "notebooks"}.get(platform)
    return Runtime(platform, work or (cwd or Path.cwd()))


def _colab_importable() -> bool:
    try:
        return importlib.util.find_spec("google.colab") is not None
    except (ModuleNotFoundError, ValueError):  # no "google" namespace at all
        return False


def on_colab() -> bool:
    """True inside Google Colab."""
    return detect_platform() == "colab"


def platform_name() -> str:
    """A short name of the service this process runs on ("Google Colab", "Kaggle", ...)."""
    return PLATFORM_NAMES[detect_platform()]


class DriveNotMounted(RuntimeError):
    """A path lies on Google Drive (/content/drive) while Drive is not mounted."""


def drive_mounted() -> bool:
    """True when Google Drive is mounted (its MyDrive folder is there)."""
    return (DRIVE_MOUNT / "MyDrive").is_dir()


def on_drive(path: str | os.PathLike) -> bool:
    """True for a path under /content/drive."""
    return Path(path).expanduser().is_relative_to(DRIVE_MOUNT)


def mount_drive() -> Path | None:
    """Mount Google Drive on Colab (asking the user to sign in the first time) and return its
    MyDrive folder; None anywhere else, where there is nothing to mount.

    Raises :class:`DriveNotMounted` when the mount fails or is refused. Call it from the
    kernel's main thread (a notebook cell): Colab's sign-in prompt needs it.
    """
    if not on_colab():
        return None
    if not drive_mounted():
        from google.colab import drive  # type: ignore[import-not-found]

        try:
            drive.mount(str(DRIVE_MOUNT))
        except Exception as exc:  # refused, timed out, or the mount point is not empty
            raise DriveNotMounted(
                f"Google Drive could not be mounted ({exc}). Allow access when asked, or use a "
                "folder of this runtime instead (lost when the runtime ends)") from exc
    return DRIVE_MOUNT / "MyDrive"


def mount_drive_if_needed(*paths: str | os.PathLike | None) -> bool:
    """Make sure Drive is mounted when one of ``paths`` lies under /content/drive.

    On Colab, from the main thread, Drive is mounted (asking the user to sign in); anywhere
    else such a path is refused with :class:`DriveNotMounted`, because folders created under an
    unmounted /content/drive land on the runtime's own disk (lost at the next disconnect) and
    make a later mount fail. Returns True when a path needed Drive (now mounted).
    """
    wanted = [str(p) for p in paths if p and on_drive(str(p))]
    if not wanted:
        return False
    if drive_mounted():
        return True
    if on_colab() and threading.current_thread() is threading.main_thread():
        mount_drive()
        return True
    where = ("Google Drive is only available on Colab" if not on_colab() else
             "mount it first: run the notebook's first cells, or mount_drive()")
    raise DriveNotMounted(f"{wanted[0]} is on Google Drive, which is not mounted: {where}")


WORK_FOLDER = "dreambooth"  # the notebooks' folder inside the runtime's persistent place


def default_work_dir(runtime: Runtime | None = None) -> Path:
    """Where the notebooks keep their work when WORK_DIR is blank: the runtime's persistent
    place, which the next notebook (on Colab: another runtime) finds again.

    Colab: Google Drive (/content/drive/MyDrive/dreambooth; each notebook opened from its badge
    gets a fresh runtime, so /content would be gone); Kaggle: /kaggle/working/dreambooth (kept
    as the notebook's output); Gradient: /notebooks/dreambooth; elsewhere ./dreambooth.
    """
    runtime = runtime or detect_runtime()
    if runtime.platform == "colab":
        return DRIVE_MOUNT / "MyDrive" / WORK_FOLDER
    return runtime.work_dir / WORK_FOLDER


def resolve_work_dir(work_dir: str | os.PathLike | None) -> Path:
    """The notebooks' WORK_DIR: blank means :func:`default_work_dir`; a Drive path (and the
    blank default on Colab) mounts Drive first, or is refused (see :func:`mount_drive_if_needed`).
    Nothing is created here."""
    text = str(work_dir or "").strip()
    path = Path(text).expanduser() if text else default_work_dir()
    mount_drive_if_needed(path)
    return path


def package_versions() -> dict[str, str | None]:
    """Versions of the packages training depends on; None for one that is not installed
    (bitsandbytes and xformers are optional, CUDA only)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "bitsandbytes",
                 "xformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


