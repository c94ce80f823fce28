"""Notebook widgets for colab-dreambooth.

This package is the only part of the project that imports ipywidgets (install the
``notebook`` extra); the core package ``colab_dreambooth`` never does.

- :class:`ConfigForm`: the configuration form, generated from the configuration model.
- :class:`TrainingView`: progress, loss curve, preview grid and a Stop button for a run.
- :class:`TrainApp`: both together, as notebook 03 shows them.
- :mod:`widgets.prepare`: uploads, captioned image grid, crop preview and data report (01).
- :class:`CaptionApp`: automatic captions and a table to edit them (01).
- :class:`ClassImagesApp`: the class-image settings, Generate, progress and a grid (02).
- :class:`ReleaseApp`: samples, export, model card, dehydrate and send (04).
- :mod:`widgets.workdir`: ``WORK_DIR/params.json``, which carries settings between notebooks.
"""

from .app import TrainApp
from .captioning import CaptionApp
from .class_images import ClassImagesApp, count_class_images
from .environment import (
    DriveNotMounted,
    mount_drive,
    mount_drive_if_needed,
    on_colab,
    platform_name,
    resolve_work_dir,
    runtime_banner,
)
from .form import ConfigForm
from .prepare import (
    DataReport,
    UploadBox,
    caption_grid,
    captioned_grid,
    colab_upload,
    crop_preview,
    data_report,
    save_uploads,
    show_images,
    upload_images,
)
from .release import ReleaseApp
from .training_view import TrainingView, estimate_total_steps
from .workdir import (
    class_images_config,
    params_file,
    prepare_config,
    release_config,
    training_config,
)

__all__ = [
    "CaptionApp", "ClassImagesApp", "ConfigForm", "DataReport", "DriveNotMounted", "ReleaseApp", "TrainApp", "TrainingView",
    "UploadBox", "caption_grid", "captioned_grid", "class_images_config", "colab_upload",
    "count_class_images", "crop_preview", "data_report", "estimate_total_steps", "mount_drive",
    "mount_drive_if_needed", "on_colab", "params_file", "platform_name", "prepare_config",
    "release_config", "resolve_work_dir", "runtime_banner", "save_uploads", "show_images", "training_config",
    "upload_images",
]
