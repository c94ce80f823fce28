"""The notebooks' shared working folder: ``WORK_DIR/params.json`` carries the settings from one
notebook to the next (01 prepares the data, 02 makes class images, 03 trains, 04 samples)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from colab_dreambooth.config.concept import Concept
from colab_dreambooth.config.params import load_params
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.demo import demo_config, make_demo_data
from colab_dreambooth.files import list_image_files
from colab_dreambooth.models.families import FAMILY, detect_family
from colab_dreambooth.runtime.environment import mount_drive_if_needed

PARAMS_FILE = "params.json"


def params_file(work_dir: str | os.PathLike) -> Path:
    """``WORK_DIR/params.json``: the parameters every notebook reads and the last one saved."""
    return Path(work_dir).expanduser() / PARAMS_FILE


def prepare_config(work_dir: str | os.PathLike, *, base_model: str, instance_dir: str = "",
                   instance_prompt: str, class_prompt: str, instance_token: str = "",
                   class_token: str = "", num_class_images: int = 0,
                   resolution: int | None = None,
                   demo_if_empty: bool = False) -> tuple[DreamBoothConfig, list[str]]:
    """The configuration notebook 01 starts from, and notes saying where things come from
    (``resolution`` None: the base model family's own, 512 for SD 1.x/2.x, 1024 for SDXL).

    Settings already saved in ``WORK_DIR/params.json`` are kept except the ones given here
    (the notebook's parameters win). A blank ``instance_dir`` means ``WORK_DIR/data/instance``;
    when that is empty and ``demo_if_empty`` is set (unattended runs), the demo subject is drawn
    there so the notebooks run end to end with no photos. Models go under ``WORK_DIR``.
    """
    work = Path(work_dir).expanduser()
    if resolution is None:  # the side the base model was trained at: 512 SD, 1024 SDXL
        resolution = FAMILY[detect_family(base_model)].resolution
    mount_drive_if_needed(work, instance_dir)  # never a folder under an unmounted Drive
    work.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    saved = params_file(work)
    if saved.is_file():
        base = load_params(saved)
        notes.append(f"Continuing from {saved}; this notebook's parameters replace its base "
                     "model, resolution and first concept's prompts and folder.")
    else:
        base = DreamBoothConfig(models_root=str(work))
    default_dir = work / "data" / "instance"
    folder = Path(instance_dir).expanduser() if instance_dir.strip() else default_dir
    if folder == default_dir:
        folder.mkdir(parents=True, exist_ok=True)  # only our own folder is created
    if demo_if_empty and folder == default_dir and not list_image_files(folder):
        make_demo_data(work / "data", size=resolution)  # images below it would be unusable
        demo = demo_config(work, resolution=resolution)
        notes.append(f"No images in {folder}: drew the demo subject there (zwx toy, with captions "
                     "and class images) so this unattended run can go on.")
        return demo.copy(pretrained_model_name_or_path=base_model), notes
    concept = base.concepts_list[0] if base.concepts_list else Concept()
    concept = dataclasses.replace(
        concept, instance_data_dir=str(folder), instance_prompt=instance_prompt,
        class_prompt=class_prompt, instance_token=instance_token, class_token=class_token,
        num_class_images=num_class_images)
    config = base.copy(pretrained_model_name_or_path=base_model, resolution=resolution,
                       models_root=base.models_root or str(work),
                       concepts_list=[concept] + base.concepts_list[1:])
    return config, notes


def training_config(work_dir: str | os.PathLike, *, base_model: str, steps: int | None = None,
                    resolution: int | None = None) -> tuple[DreamBoothConfig, list[str]]:
    """The configuration notebook 03 starts from: ``WORK_DIR/params.json`` as 01 (or an earlier
    run) saved it, with Training Steps and Resolution replaced when given.

    ``base_model`` is used only when there is no params.json yet (the form then starts blank).
    """
    work = Path(work_dir).expanduser()
    mount_drive_if_needed(work)  # never a folder under an unmounted Drive
    saved = params_file(work)
    notes: list[str] = []
    if saved.is_file():
        config = load_params(saved)
        notes.append(f"Loaded {saved} (base model {config.base_model}).")
    else:
        work.mkdir(parents=True, exist_ok=True)
        config = DreamBoothConfig(pretrained_model_name_or_path=base_model, models_root=str(work))
        notes.append(f"No {saved} yet: run 01_prepare_data first, or fill in the concepts below.")
    changes = {}
    if steps is not None:
        changes["max_train_steps"] = steps
    if resolution is not None:
        changes["resolution"] = resolution
    return config.copy(**changes), notes


def class_images_config(work_dir: str | os.PathLike, *, base_model: str,
                        num_class_images: int | None = None, class_steps: int | None = None
                        ) -> tuple[DreamBoothConfig, list[str]]:
    """The configuration notebook 02 starts from: ``WORK_DIR/params.json`` with, when given,
    Total Number of Class Images and Classification Steps replaced in every concept that has a
    class prompt. ``base_model`` is used only when there is no params.json yet."""
    config, notes = training_config(work_dir, base_model=base_model)
    concepts = [dataclasses.replace(
        c, **({"num_class_images": num_class_images} if num_class_images is not None else {}),
        **({"class_infer_steps": class_steps} if class_steps is not None else {}))
        if c.class_prompt.strip() else c for c in config.concepts_list]
    return config.copy(concepts_list=concepts), notes


def release_config(work_dir: str | os.PathLike, *, base_model: str,
                   n_samples: int | None = None, sample_steps: int | None = None
                   ) -> tuple[DreamBoothConfig, list[str]]:
    """The configuration notebook 04 starts from: ``WORK_DIR/params.json`` as 03 saved it
    (what trained), with Number of Samples and Sample Steps replaced in every concept when
    given. ``base_model`` is used only when there is no params.json."""
    config, notes = training_config(work_dir, base_model=base_model)
    concepts = [dataclasses.replace(
        c, **({"n_save_sample": n_samples} if n_samples is not None else {}),
        **({"save_infer_steps": sample_steps} if sample_steps is not None else {}))
        for c in config.concepts_list]
    return config.copy(concepts_list=concepts), notes
