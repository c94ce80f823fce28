"""Pipelines: from a model (a trained folder, a run's working folder, a LoRA run or a base model
with a LoRA file applied, on the GPU when there is one), or from components already loaded.

Every pipeline the package makes from loaded modules comes from :func:`pipeline_from_components`,
so each has the same settings: no safety checker (DreamBooth models are the user's own) and
no progress bar of its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from colab_dreambooth.errors import ModelLoadError
from colab_dreambooth.models.families import FAMILY, SDXL, folder_family
from colab_dreambooth.models.loading import (
    Components,
    dtype_argument,
    load_vae,
    resolve_model_folder,
)
from colab_dreambooth.models.lora import load_adapters, lora_file_path
from colab_dreambooth.models.lora_file import needs_peft_loader, read_lora, state_for_diffusers
from colab_dreambooth.models.text_encoding import DualTextEncoder, text_parts

if TYPE_CHECKING:
    from colab_dreambooth.config.settings import DreamBoothConfig


def pipeline_from_components(parts: Components, *, unet: Any = None,
                             text_encoder: Any = None) -> Any:
    """A ``StableDiffusionPipeline`` (SDXL: ``StableDiffusionXLPipeline``) of ``parts`` with
    its sampling scheduler, without safety checker and with its progress bar off.

    ``unet`` and ``text_encoder`` (SDXL: both encoders as one ``DualTextEncoder``) replace
    those of ``parts``: training passes the ones it is training, to preview or save them. The
    pipeline holds the modules themselves (no copy), where they are.
    """
    unet = parts.unet if unet is None else unet
    encoders = text_parts(parts.text_encoder if text_encoder is None else text_encoder)
    if parts.family == SDXL:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=parts.vae, text_encoder=encoders["text_encoder"],
            text_encoder_2=encoders["text_encoder_2"], tokenizer=parts.tokenizer,
            tokenizer_2=parts.tokenizer_2, unet=unet, scheduler=parts.inference_scheduler,
            force_zeros_for_empty_prompt=_index_setting(parts.source,
                                                        "force_zeros_for_empty_prompt", True))
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=parts.vae, text_encoder=encoders["text_encoder"], tokenizer=parts.tokenizer,
            unet=unet, scheduler=parts.inference_scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _index_setting(folder: str, name: str, default: Any) -> Any:
    """A pipeline setting from a model folder's ``model_index.json`` (default when absent)."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default
    return index.get(name, default)


def load_pipeline(model_dir: str | Path, device: str | None = None,
                  dtype: torch.dtype | None = None):
    """A ``StableDiffusionPipeline`` (an SDXL model: ``StableDiffusionXLPipeline``) from a
    model, on the GPU when there is one (in fp16 there, fp32 on the CPU, unless ``dtype`` says
    otherwise).

    ``model_dir`` is a diffusers folder, a model's working folder holding ``model/`` (what
    :func:`~colab_dreambooth.training.train.train` writes), ``tiny``, ``tiny-sdxl``, a single
    ``.safetensors``/``.ckpt`` file or a Hub id.
    """
    folder = resolve_model(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
    import diffusers

    family = folder_family(folder)
    # SD's pipeline has a safety checker slot (DreamBooth models are the user's own: none).
    extra = {} if family == SDXL else {"safety_checker": None, "requires_safety_checker": False}
    pipe = getattr(diffusers, FAMILY[family].pipeline).from_pretrained(
        str(folder), **dtype_argument(dtype), **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_trained_pipeline(config: "DreamBoothConfig", device: str | None = None):
    """The pipeline of what ``config``'s run trained: its ``model/`` folder, or, for a LoRA
    run, the base model with the run's LoRA file applied."""
    device = device or ("cpu" if config.use_cpu else None)
    if config.use_lora:
        file = lora_file_path(config)
        if not file.is_file():
            raise ModelLoadError(f"no trained LoRA at {file}: train first (notebook 03), or set "
                                 "Models root and Model name to those of the run")
        return load_lora_pipeline(config.base_model, file, device=device,
                                  vae=config.pretrained_vae_name_or_path)
    model = config.model_dir / "model"
    if not (model / "model_index.json").is_file():
        raise ModelLoadError(f"no trained model in {model}: train first (notebook 03), or set "
                             "Models root and Model name to those of the run")
    return load_pipeline(model, device)


def lora_run(folder: str | Path) -> tuple[str, Path] | None:
    """``(base model, LoRA file)`` when ``folder`` is what a LoRA run wrote: its ``lora/``
    folder or its working folder ``<models root>/dreambooth/<name>`` (which has no
    ``model/``); None otherwise."""
    folder = Path(folder).expanduser()
    for candidate in (folder, folder / "lora"):
        info_file = candidate / "training_info.json"
        if not info_file.is_file():
            continue
        try:
            info = json.loads(info_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if info.get("lora") and info.get("lora_file") and info.get("base_model"):
            return str(info["base_model"]), candidate / info["lora_file"]
    return None


def resolve_model(model: str | Path) -> Path:
    """The diffusers folder to sample from; see :func:`load_pipeline` for what is accepted."""
    path = Path(model).expanduser()
    if path.is_dir() and not (path / "model_index.json").is_file():
        if (path / "model" / "model_index.json").is_file():
            return path / "model"  # the working folder <models root>/dreambooth/<name>
        if lora_run(path):
            raise ModelLoadError(f"{path} holds a LoRA run, not a model folder: sample it with "
                                 "its base model and LoRA file (`sample BASE --lora FILE`, or "
                                 "`sample` on the run's folder)")
        raise ModelLoadError(f"{path} is not a diffusers model folder (it has no "
                             "model_index.json): give the folder training wrote, "
                             "<models root>/dreambooth/<model name>/model (a LoRA run: "
                             "the base model with --lora <name>/lora/<name>.safetensors)")
    if not path.exists() and str(model).replace("\\", "/").count("/") > 1:
        # A Hub id is owner/name: anything deeper is a local path that is not there.
        raise ModelLoadError(f"model folder {path} not found")
    return resolve_model_folder(str(model))


def pipeline_text_encoder(pipe) -> Any:
    """A pipeline's text encoder(s) as training holds them: SDXL's two as one
    :class:`~colab_dreambooth.models.text_encoding.DualTextEncoder` (sharing the modules)."""
    encoder_2 = getattr(pipe, "text_encoder_2", None)
    return pipe.text_encoder if encoder_2 is None else DualTextEncoder(pipe.text_encoder,
                                                                       encoder_2)


def load_lora_pipeline(base_model: str, lora_file: str | os.PathLike, *,
                       device: str | None = None, scale: float = 1.0, vae: str = ""):
    """The base model's pipeline with the LoRA file applied (diffusers' ``load_lora_weights``;
    peft for the types it cannot read). ``scale`` is the WebUI's ``<lora:name:scale>``
    multiplier; ``vae`` another VAE (the run's VAE field), see :func:`load_vae`."""
    folder = resolve_model_folder(base_model)
    pipe = load_pipeline(folder, device=device)
    if vae.strip():
        pipe.vae = load_vae(vae, folder)[0].to(pipe.device, pipe.dtype)
    state = read_lora(lora_file)[0]
    text_encoder = pipeline_text_encoder(pipe)
    if needs_peft_loader(state):  # LoHa, LoKr, DoRA: diffusers cannot apply them to SD
        load_adapters(state, pipe.unet, text_encoder, adapter_name="lora", scale=scale)
        return pipe
    pipe.load_lora_weights(state_for_diffusers(state, text_encoder), adapter_name="lora")
    if scale != 1.0:
        pipe.set_adapters(["lora"], adapter_weights=[scale])
    return pipe
