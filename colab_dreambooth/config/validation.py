"""Checks on a configuration, run before any model is loaded.

:func:`validate` returns every problem at once, each naming the field (or the concept number and
field) and saying what to do, so a user fixes them all in one go instead of one per GPU start.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from colab_dreambooth.config.concept import Concept
from colab_dreambooth.config.fields import coerce, field_specs
from colab_dreambooth.config.prompts import contains_token
from colab_dreambooth.config.settings import DORA_TYPES, TINY_MODELS, DreamBoothConfig
from colab_dreambooth.errors import ConfigError, Problem
from colab_dreambooth.runtime import environment as runtime
from colab_dreambooth.runtime.device import detect_device
from colab_dreambooth.runtime.packages import (
    OPTIMIZER_PACKAGES,
    missing_package_message,
    optimizer_available,
)
from colab_dreambooth.runtime.storage import HubRepo, StorageError, parse_destination

if TYPE_CHECKING:
    from colab_dreambooth.runtime.device import DeviceInfo

# Prodigy estimates its own step size and multiplies it by the learning rate: about 1.0.
PRODIGY_MIN_LR = 0.1


def validate(config: "DreamBoothConfig", device: "DeviceInfo | None" = None, *,
             check_paths: bool = True) -> list[Problem]:
    """Every problem with ``config``; an empty list means it can train.

    ``device`` is the GPU (or CPU) it will run on (detected when omitted); ``check_paths``
    checks that local folders and files exist.
    """

    if device is None:
        device = detect_device()
    problems = list(_field_problems(config, DreamBoothConfig, ""))

    if not config.max_train_steps and not config.num_train_epochs:
        problems.append(Problem("max_train_steps", "Training Steps and Training Epochs are both "
                                "blank: set one of them (steps win when both are set)"))
    if (isinstance(config.resolution, int) and config.resolution % 64
            and "resolution" not in {p.where for p in problems}):  # one message per field
        problems.append(Problem("resolution", f"{config.resolution} is not a multiple of 64: "
                                "use 512, 576, 640, 704 or 768"))
    problems += _bucket_problems(config)
    if config.use_cpu and config.use_8bit_adam:
        problems.append(Problem("use_8bit_adam", "8-bit Adam needs a CUDA GPU and Use CPU Only "
                                "is on: turn one of them off"))
    if (config.mixed_precision == "bf16" and not config.use_cpu and device.kind == "cuda"
            and not device.bf16):
        problems.append(Problem("mixed_precision", f"bf16 is not supported by this GPU "
                                f"({device.name}): choose fp16 (T4, V100) or no"))
    if (config.full_fp16 is True and config.mixed_precision == "no" and not config.use_cpu
            and device.kind == "cuda"):
        problems.append(Problem("full_fp16", "Half model keeps the weights in fp16 and needs "
                                "Mixed precision fp16 (or bf16) for its loss scaling: choose "
                                "one, or turn Half model off"))
    if check_paths:
        problems += _base_model_problems(config) + _vae_problems(config)
    if check_paths:
        problems += _unmounted_drive_problems(config)
    problems += _hub_repo_problems(_text(config.checkpoint_hub_repo))

    problems += optimizer_problems(config)


    problems += lora_problems(config)
    concepts_path = _text(config.concepts_path)
    if check_paths and concepts_path and not Path(concepts_path).expanduser().is_file():
        problems.append(Problem("concepts_path", f"the concepts file {concepts_path} does not "
                                "exist: fix the path or clear it to use the inline concepts"))
    concepts = config.concepts_list
    if not isinstance(concepts, list):
        problems.append(Problem("concepts_list", f"expected a list of concepts, got "
                                f"{type(concepts).__name__}"))
        concepts = []
    elif not concepts and not concepts_path:
        problems.append(Problem("concepts_list", "no concept to train: add one with an instance "
                                "prompt and an instance dataset directory"))
    for number, concept in enumerate(concepts, start=1):
        if not isinstance(concept, Concept):
            problems.append(Problem(f"concept {number}", "is not a Concept object"))
            continue
        problems += _concept_problems(concept, f"concept {number} ", check_paths)
    return problems


def check_config(config: "DreamBoothConfig", device: "DeviceInfo | None" = None) -> None:
    """Raise :class:`ConfigError` when :func:`validate` finds anything."""
    problems = validate(config, device)
    if problems:
        raise ConfigError(problems)


def _concept_problems(concept, prefix: str, check_paths: bool) -> list[Problem]:

    problems = list(_field_problems(concept, Concept, prefix))
    token = _text(concept.instance_token)
    class_prompt = _text(concept.class_prompt)
    if re.search(r"[\s,]", token):
        problems.append(Problem(prefix + "instance_token", f"'{token}' holds spaces or commas: "
                                "the instance token is one rare word such as 'sks' (put the "
                                "class word in Class Token)"))
    if token and contains_token(class_prompt, token):
        problems.append(Problem(prefix + "class_prompt", f"'{class_prompt}' holds the "
                                f"instance token '{token}': class images must show the generic "
                                "class, so remove it"))
    if not _text(concept.instance_prompt):
        problems.append(Problem(prefix + "instance_prompt", "blank: write the prompt that calls "
                                "your subject, e.g. 'photo of sks dog' or '[filewords]'"))
    num_class_images = concept.num_class_images
    if not class_prompt and ((isinstance(num_class_images, int) and num_class_images > 0)
                             or _text(concept.class_data_dir)):
        problems.append(Problem(prefix + "class_prompt", "prior preservation is asked for (class "
                                "images or a class folder are set) but the class prompt is "
                                "blank: write one, e.g. 'photo of a dog', or set Total Number of "
                                "Class Images to 0 and clear the class folder"))
    folder = _text(concept.instance_data_dir)
    if not folder:
        problems.append(Problem(prefix + "instance_data_dir", "blank: set the folder that holds "
                                "the subject's images"))
    elif check_paths and not Path(folder).expanduser().is_dir():
        problems.append(Problem(prefix + "instance_data_dir", f"folder {folder} does not exist "
                                "on this machine (a file from another machine?): point it at "
                                "your images"))
    template = _text(concept.save_sample_template)
    if check_paths and template and not Path(template).expanduser().is_file():
        problems.append(Problem(prefix + "save_sample_template", f"file {template} not found"))
    return problems


def _bucket_problems(config) -> list[Problem]:
    """Bucket sides: multiples of 64, the smallest at most the resolution, the largest at
    least it (else no bucket would hold Resolution x Resolution pixels)."""
    if config.enable_bucket is not True or not isinstance(config.resolution, int):
        return []
    problems = []
    sides = {"min_bucket_reso": config.min_bucket_reso, "max_bucket_reso": config.max_bucket_reso}
    for name, side in sides.items():
        if isinstance(side, int) and side % 64:
            problems.append(Problem(name, f"{side} is not a multiple of 64: bucket sides must "
                                    "be (e.g. 256, 320, 384 ...), or leave it blank"))
    low, high = sides["min_bucket_reso"], sides["max_bucket_reso"]
    if isinstance(low, int) and low > config.resolution:
        problems.append(Problem("min_bucket_reso", f"{low} is above the resolution "
                                f"{config.resolution}: lower it, or leave it blank"))
    if isinstance(high, int) and high < config.resolution:
        problems.append(Problem("max_bucket_reso", f"{high} is below the resolution "
                                f"{config.resolution}: raise it, or leave it blank"))
    return problems


def _text(value) -> str:
    """A text field stripped; a value of the wrong type (reported elsewhere) counts as blank."""
    return value.strip() if isinstance(value, str) else ""


def _field_problems(obj, cls, prefix: str) -> Iterable[Problem]:
    """Types, ranges and choices of every declared field."""
    for name, spec in field_specs(cls).items():
        value = getattr(obj, name)
        if name == "concepts_list":
            continue
        try:
            value = coerce(spec, value)
        except TypeError as exc:
            yield Problem(prefix + name, str(exc))
            continue
        s = spec.setting
        if value is None:
            continue
        if s.choices is not None and value not in s.choices:
            yield Problem(prefix + name, f"{value!r} is not one of: "
                          + ", ".join(repr(c) for c in s.choices))
        if s.minimum is not None and value < s.minimum:
            yield Problem(prefix + name, f"{value} is below the minimum {s.minimum:g}")
        if s.maximum is not None and value > s.maximum:
            yield Problem(prefix + name, f"{value} is above the maximum {s.maximum:g}")


def looks_like_local_path(name: str) -> bool:
    """True for a file-system path, False for a Hub id like ``org/model`` or ``tiny``.

    ``models/sd15`` has a Hub id's shape, but when a folder ``models`` is here it is a local
    path (mistyped or not yet made): saying so beats a network error about a repo."""
    return (name.startswith((".", "/", "~")) or "\\" in name or re.match(r"^[A-Za-z]:", name)
            is not None or name.count("/") > 1 or Path(name).suffix in (".ckpt", ".safetensors")
            or Path(name).expanduser().exists()
            or (name.count("/") == 1 and Path(name.split("/")[0]).expanduser().is_dir()))


def _hub_repo_problems(hub: str) -> list[Problem]:

    try:
        ok = not hub or isinstance(parse_destination(hub), HubRepo)
    except StorageError:
        ok = False
    return [] if ok else [Problem("checkpoint_hub_repo", f"{hub!r} is not a Hub repo: write "
                                  "hf://<user or org>/<repo name>, or leave it blank")]


def _unmounted_drive_problems(config) -> list[Problem]:
    """Folders on Google Drive while Drive is not mounted: writing there would fill the
    runtime's own disk (lost at the next disconnect) and block mounting Drive later."""

    if runtime.drive_mounted():
        return []
    how = ("mount it first (the notebooks' first cells do; in code: "
           "colab_dreambooth.runtime.environment.mount_drive())" if runtime.on_colab()
           else "Google Drive is only available on Colab: use a folder of this machine")
    fields = [(name, getattr(config, name)) for name in ("models_root", "checkpoint_dir")]
    concepts = config.concepts_list if isinstance(config.concepts_list, list) else []
    for number, concept in enumerate(concepts, start=1):  # a wrong type is reported elsewhere
        fields += [(f"concept {number} {name}", getattr(concept, name, ""))
                   for name in ("instance_data_dir", "class_data_dir")]
    return [Problem(where, f"{value} is on Google Drive, which is not mounted: {how}")
            for where, value in fields
            if _text(value) and runtime.on_drive(_text(value))]


def _base_model_problems(config) -> list[Problem]:

    src = _text(config.src)
    field = "src" if src else "pretrained_model_name_or_path"
    name = src or _text(config.pretrained_model_name_or_path)
    if not name:
        return [Problem(field, "blank: name a Hub id, a diffusers folder, a .safetensors/.ckpt "
                        "file or 'tiny'")]
    if (name not in TINY_MODELS and looks_like_local_path(name)
            and not Path(name).expanduser().exists()):
        return [Problem(field, f"{name} does not exist on this machine "
                        f"({Path(name).expanduser().absolute()}): point it at a diffusers "
                        "folder or a .safetensors/.ckpt file, or give a Hub id")]
    return []


def _vae_problems(config) -> list[Problem]:
    name = _text(config.pretrained_vae_name_or_path)
    if name and looks_like_local_path(name) and not Path(name).expanduser().exists():
        return [Problem("pretrained_vae_name_or_path", f"{name} does not exist on this machine "
                        f"({Path(name).expanduser().absolute()}): point it at a diffusers VAE "
                        "folder or a .safetensors VAE, give a Hub id, or leave it blank for "
                        "the base model's VAE")]
    return []


def optimizer_problems(config) -> list:
    """What stops ``config``'s optimizer from training well, found before any model loads."""

    name = config.optimizer
    problems = []
    if not isinstance(name, str):
        return problems  # the field check reports the type
    if name in OPTIMIZER_PACKAGES and not optimizer_available(name):
        problems.append(Problem("optimizer", missing_package_message(name)))
    if name == "Prodigy":
        rates = ({"lora_learning_rate": config.lora_learning_rate,
                  "lora_txt_learning_rate": config.lora_txt_learning_rate} if config.use_lora
                 else {"learning_rate": config.learning_rate,
                       "text_encoder_learning_rate": config.text_encoder_learning_rate})
        if config.train_text_encoder is False:  # blank (the GPU preset decides) is checked
            rates.pop("lora_txt_learning_rate" if config.use_lora
                      else "text_encoder_learning_rate")
        for field, lr in rates.items():
            if isinstance(lr, (int, float)) and lr < PRODIGY_MIN_LR:
                problems.append(Problem(field, f"{lr:g} with the Prodigy optimizer: Prodigy "
                                        "finds its own step size and multiplies it by the "
                                        "learning rate, so set it to about 1.0 (0.5 for a "
                                        "gentler text encoder)"))
    return problems


def lora_problems(config: "DreamBoothConfig") -> list[Problem]:
    """What stops ``config`` from training LoRA (nothing when Use LORA is off).

    Ranks below 1 are caught by the fields' own limits; this adds the combinations.
    """
    if not config.use_lora:
        return []
    problems = []
    if importlib.util.find_spec("peft") is None:
        problems.append(Problem("use_lora", "LoRA training needs the peft package: "
                                "pip install 'peft>=0.13'"))
    if config.use_dora and config.lora_type not in DORA_TYPES:
        problems.append(Problem("use_dora", f"DoRA applies to Lora Type LoRA or LoCon, not "
                                f"{config.lora_type}: turn off Use DoRA or change the type"))
    if config.lora_type == "LoCon" and config.lora_conv_rank < 1:
        problems.append(Problem("lora_conv_rank", "LoCon with Lora Conv Rank 0 is plain LoRA on "
                                "more layers: set a conv rank (4-16 is usual)"))
    if config.use_ema:
        problems.append(Problem("use_ema", "Train EMA averages the full UNet and does not "
                                "apply to LoRA (an average of the two LoRA factors is not the "
                                "average of their product): turn off Train EMA, or Use LORA"))
    return problems


def check_lora(config: "DreamBoothConfig") -> None:
    """Raise :class:`ConfigError` when :func:`lora_problems` finds anything."""
    problems = lora_problems(config)
    if problems:
        raise ConfigError(problems)
