"""Where the notebook runs: Colab, Kaggle or plain Jupyter, the GPU, and Google Drive."""

from __future__ import annotations

import html
import importlib.util
import os
from pathlib import Path

from colab_dreambooth.runtime import DeviceInfo

DRIVE_MOUNT = Path("/content/drive")


def on_colab() -> bool:
    """True inside Google Colab (its ``google.colab`` package is importable)."""
    try:
        return importlib.util.find_spec("google.colab") is not None
    except ModuleNotFoundError:  # no "google" namespace at all
        return False


def platform_name() -> str:
    """A short name of the notebook service this kernel runs on."""
    if on_colab():
        return "Google Colab"
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        return "Kaggle"
    if os.environ.get("PAPERSPACE_NOTEBOOK_REPO_ID") or os.environ.get("PAPERSPACE_CLUSTER_ID"):
        return "Paperspace Gradient"
    return "Jupyter"


def mount_drive_if_needed(*paths: str | os.PathLike) -> bool:
    """Mount Google Drive when on Colab and one of ``paths`` lies under /content/drive.

    Mounting asks the user to sign in, so it happens only when a path needs it. Returns True
    when Drive is (now) mounted.
    """
    wanted = any(str(p).startswith(str(DRIVE_MOUNT)) for p in paths if p)
    if not (wanted and on_colab()):
        return False
    if not (DRIVE_MOUNT / "MyDrive").is_dir():
        from google.colab import drive  # type: ignore[import-not-found]

        drive.mount(str(DRIVE_MOUNT))
    return True


def runtime_banner(device: DeviceInfo, preset: str | None = None) -> str:
    """HTML line naming the service, the GPU (memory, bf16) and the preset in use."""
    if device.kind == "cuda":
        gpus = f" x{device.count}" if device.count > 1 else ""
        gpu = (f"{html.escape(device.name)}{gpus}, {device.memory_gb:.1f} GB, "
               f"bf16 {'yes' if device.bf16 else 'no'}")
    else:
        gpu = "none (training runs on the CPU: fine for the tiny model, very slow for SD)"
    preset_text = html.escape(preset) if preset else "none yet"
    return (f"<b>Runtime</b>: {html.escape(platform_name())} &nbsp;|&nbsp; <b>GPU</b>: {gpu}"
            f" &nbsp;|&nbsp; <b>preset</b>: {preset_text}")
