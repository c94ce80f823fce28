"""Which model family a base model is (SD 1.x/2.x or SDXL), told without loading or downloading
its weights: from the name of a built-in model, a diffusers folder's ``model_index.json``, a
single file's weight names (its header only), a Hub model's ``model_index.json`` when it is
in the Hub cache, and last from the name (no network: a lookup would stall an offline machine
for a minute). Loading a model reads its downloaded folder, which has the last word.

:func:`detect_family` is what the memory estimate, the presets, the forms and the loaders ask;
:mod:`colab_dreambooth.models.families` holds what each family then does.
"""

from __future__ import annotations

import json
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from colab_dreambooth.config.settings import TINY_MODEL, TINY_SDXL_MODEL
from colab_dreambooth.models.single_file.readers import open_model_file

log = logging.getLogger(__name__)

SD = "SD"  # Stable Diffusion 1.x and 2.x: one CLIP text encoder
SDXL = "SDXL"  # Stable Diffusion XL: two text encoders, pooled and size/crop conditioning
FAMILIES = (SD, SDXL)
# The side length each family was trained at: what a form proposes when the family changes.
DEFAULT_RESOLUTION = {SD: 512, SDXL: 1024}

# Pipelines of the SDXL family in model_index.json (base, and fine-tunes saved by any tool).
_SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                   "StableDiffusionXLInpaintPipeline")
# An SDXL single file keeps its second (OpenCLIP bigG) text encoder here.
_SDXL_FILE_KEY = re.compile(r"^conditioner\.embedders\.1\.")
# Hub names that are SDXL-shaped (for an id whose files cannot be read: offline, gated).
# "RealVisXL_V4.0", "dreamshaper-xl-1-0", "sdxl-turbo", Pony and Illustrious fine-tunes.
_SDXL_NAME = re.compile(r"xl(?![a-z])|pony|illustrious|noobai", re.IGNORECASE)


def detect_family(base_model: str) -> str:
    """``"SD"`` or ``"SDXL"`` for ``base_model`` (``tiny``, ``tiny-sdxl``, a diffusers folder,
    a ``.safetensors``/``.ckpt`` file, a model's working folder or a Hub id)."""
    return _detect(base_model.strip())


@lru_cache(maxsize=64)
def _detect(name: str) -> str:
    if name == TINY_MODEL:
        return SD
    if name == TINY_SDXL_MODEL:
        return SDXL
    path = Path(name).expanduser()
    if path.is_dir():
        return folder_family(path)
    if path.suffix.lower() in (".safetensors", ".ckpt", ".pt"):
        converted = path.with_name(path.stem + "-diffusers")
        if (converted / "model_index.json").is_file():
            return folder_family(converted)
        if path.is_file():
            return file_family(path)
        return SD
    index = _hub_model_index(name)
    if index is not None:
        return _index_family(index)
    return SDXL if _SDXL_NAME.search(name) else SD


def folder_family(folder: str | Path) -> str:
    """The family of a diffusers folder (or of the ``model/`` a training run wrote in it)."""
    folder = Path(folder)
    for candidate in (folder, folder / "model"):
        index = candidate / "model_index.json"
        if index.is_file():
            try:
                return _index_family(json.loads(index.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                break
    return SDXL if (folder / "text_encoder_2").is_dir() else SD


def file_family(path: str | Path) -> str:
    """The family of a single-file model, from its weight names alone."""
    source = open_model_file(path)
    try:
        return keys_family(source.shapes)
    finally:
        source.release()


def keys_family(keys: Iterable[str]) -> str:
    """The family of a single-file model's weight names (SDXL: a second text encoder under
    ``conditioner.embedders.1.``)."""
    return SDXL if any(_SDXL_FILE_KEY.match(k) for k in keys) else SD


def _index_family(index: dict) -> str:
    if index.get("_class_name") in _SDXL_PIPELINES or "text_encoder_2" in index:
        return SDXL
    return SD


def _hub_model_index(repo_id: str) -> dict | None:
    """A Hub model's ``model_index.json`` from the Hub cache, or None when it is not there."""
    if repo_id.count("/") != 1 or Path(repo_id).expanduser().exists():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "model_index.json")
        if not isinstance(found, str):
            return None
        return json.loads(Path(found).read_text(encoding="utf-8"))
    except Exception as exc:  # a bad id or unreadable cache: the name decides
        log.debug("no model_index.json for %s: %s", repo_id, exc)
        return None


__all__ = ["DEFAULT_RESOLUTION", "FAMILIES", "SD", "SDXL", "detect_family", "file_family",
           "folder_family", "keys_family"]
