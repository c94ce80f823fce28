"""The model families (Stable Diffusion 1.x/2.x and SDXL): what differs between them, and
telling which one a base model is.

:class:`ModelFamily` (:data:`FAMILY`) holds what differs as data: the text encoders (diffusers
sub-folders, transformers classes, kohya LoRA prefixes), the diffusers pipeline, the training
resolution. The behaviour that differs sits behind two objects the one training loop uses:
the text module (SD's CLIP, or SDXL's two encoders as one
:class:`~colab_dreambooth.models.text_encoding.DualTextEncoder`) and the
:class:`~colab_dreambooth.models.text_encoding.Conditioning` it returns (SDXL adds the pooled
embedding and each image's size/crop numbers to the UNet's inputs).

:func:`detect_family` tells the family without loading or downloading weights: from the name
of a built-in model, a diffusers folder's ``model_index.json``, a single file's weight names
(its header only), a Hub model's ``model_index.json`` when it is in the Hub cache, and last
from the name (no network: a lookup would stall an offline machine for a minute). Loading a
model reads its downloaded folder, which has the last word. The memory estimate, the presets,
the forms and the loaders ask it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping

from colab_dreambooth.config.settings import SD, SDXL, TINY_MODEL, TINY_SDXL_MODEL
from colab_dreambooth.models.single_file.readers import open_model_file

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ModelFamily:
    """What a model family is made of, as data."""

    name: str  # SD or SDXL
    label: str  # for people
    resolution: int  # the side it was trained at: what the forms propose for it
    pipeline: str  # the diffusers pipeline class
    # Per text encoder, in order: (diffusers sub-folder, tokenizer sub-folder, transformers
    # class, kohya LoRA prefix).
    text_encoders: tuple[tuple[str, str, str, str], ...]

    @property
    def lora_prefixes(self) -> dict[str, str]:
        """kohya's LoRA key prefix of each text encoder, by diffusers sub-folder."""
        return {folder: prefix for folder, _, _, prefix in self.text_encoders}


FAMILY = {
    SD: ModelFamily(SD, "Stable Diffusion", 512, "StableDiffusionPipeline",
                    (("text_encoder", "tokenizer", "CLIPTextModel", "lora_te_"),)),
    SDXL: ModelFamily(SDXL, "Stable Diffusion XL", 1024, "StableDiffusionXLPipeline",
                      (("text_encoder", "tokenizer", "CLIPTextModel", "lora_te1_"),
                       ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection",
                        "lora_te2_"))),
}

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


# ----------------------------------------------------------------------------- names in files
def unet_version(unet_config: Mapping | object) -> str:
    """``sd1``, ``sd2`` or ``sdxl`` from a UNet's config (a dict or a config object): SDXL's
    size/crop ("text_time") conditioning, SD 2.x's OpenCLIP ViT-H width (1024), else SD 1.x."""
    def get(key: str, default=None):
        if isinstance(unet_config, Mapping):
            return unet_config.get(key, default)
        return getattr(unet_config, key, default)

    if get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if get("cross_attention_dim", 768) == 1024 else "sd1"


def architecture_names(version: str, v_prediction: bool) -> tuple[str, str]:
    """``(kohya's ss_base_model_version, SAI's modelspec.architecture)`` of a model version
    (:func:`unet_version`), the names the WebUI and other tools read from a file's header."""
    if version == "sdxl":
        return "sdxl_base_v1-0", "stable-diffusion-xl-v1-base"
    if version == "sd2":
        return (("sd_v2_v", "stable-diffusion-v2-768-v") if v_prediction
                else ("sd_v2", "stable-diffusion-v2-512"))
    return ("sd_v1_v" if v_prediction else "sd_v1"), "stable-diffusion-v1"


__all__ = ["FAMILY", "ModelFamily", "SD", "SDXL", "architecture_names", "detect_family",
           "file_family", "folder_family", "keys_family", "unet_version"]
