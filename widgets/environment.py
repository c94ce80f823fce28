"""The notebooks' runtime banner: the service, the GPU and the preset its settings come from.

Detection lives in the core (:mod:`colab_dreambooth.runtime.environment`); its helpers are
re-exported here so notebooks keep importing them from ``widgets``.
"""

from __future__ import annotations

import html

from colab_dreambooth.config.presets import choose_preset
from colab_dreambooth.runtime.device import DeviceInfo
from colab_dreambooth.runtime.environment import (
    DRIVE_MOUNT,
    DriveNotMounted,
    mount_drive,
    mount_drive_if_needed,
    on_colab,
    platform_name,
    resolve_work_dir,
)

__all__ = ["DRIVE_MOUNT", "DriveNotMounted", "mount_drive", "mount_drive_if_needed", "on_colab",
           "platform_name", "resolve_work_dir", "runtime_banner"]


def runtime_banner(device: DeviceInfo, preset: str | None = None) -> str:
    """HTML line naming the service, the GPU (memory, bf16) and the preset in use (the GPU's
    own when ``preset`` is None: blank fields of the form take its values)."""
    if device.kind == "cuda":
        gpus = f" x{device.count}" if device.count > 1 else ""
        gpu = (f"{html.escape(device.name)}{gpus}, {device.memory_gb:.1f} GB, "
               f"bf16 {'yes' if device.bf16 else 'no'}")
    else:
        gpu = "none (training runs on the CPU: fine for the tiny model, very slow for SD)"
    if preset is None:
        chosen = choose_preset(device)
        preset = f"{chosen.name} ({chosen.label}; fills the fields left on auto)"
    return (f"<b>Runtime</b>: {html.escape(platform_name())} &nbsp;|&nbsp; <b>GPU</b>: {gpu}"
            f" &nbsp;|&nbsp; <b>preset</b>: {html.escape(preset)}")
