"""The trained model written out: a diffusers folder, or with Use LORA one LoRA file."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from colab_dreambooth.config.params import save_params
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.data.dataset import TrainingData
from colab_dreambooth.files import save_folder_atomic, write_text_atomic
from colab_dreambooth.models.loading import Components
from colab_dreambooth.models.lora import lora_file_path, lora_metadata
from colab_dreambooth.models.lora_file import kohya_state_dict, save_lora
from colab_dreambooth.models.pipelines import pipeline_from_components
from colab_dreambooth.models.text_encoding import text_parts
from colab_dreambooth.training.optim import EMA, StepPlan

log = logging.getLogger(__name__)


def save_model(accelerator, config: DreamBoothConfig, parts: Components, unet, text_encoder,
               ema: EMA | None, step: int, seed: int, plan: StepPlan,
               data: TrainingData) -> Path:
    """Write the model as a diffusers folder, ``<model dir>/model``, atomically (with Use
    LORA: the LoRA file and its params into ``<model dir>/lora``)."""
    target = config.model_dir / ("lora" if config.use_lora else "model")
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return target
    unet = accelerator.unwrap_model(unet)
    text_encoder = accelerator.unwrap_model(text_encoder)
    if config.use_lora:
        return save_lora_model(config, parts, unet, text_encoder, step, seed, plan, data)

    def write(folder: Path) -> None:
        pipeline_from_components(parts, unet=unet, text_encoder=text_encoder).save_pretrained(
            folder)
        # Frozen parts cast to fp16/bf16 for training are saved as the base's exact files.
        frozen = {"vae": parts.vae}
        if not config.train_text_encoder:
            frozen.update(text_parts(text_encoder))  # SDXL: both encoders
        sources = {"vae": parts.vae_folder}  # another VAE: its own folder (or None)
        for name, module in frozen.items():
            source = sources.get(name, str(Path(parts.source) / name))
            if next(module.parameters()).dtype != torch.float32 and source is not None:
                shutil.rmtree(folder / name)
                shutil.copytree(source, folder / name)
        if ema is not None:
            ema_unet = type(unet).from_config(unet.config)
            ema.copy_to(ema_unet.parameters())
            ema_unet.save_pretrained(folder / "unet_ema")
        save_params(config, folder / "params.json")
        info = _training_info(config, step, seed, plan, ema=ema is not None)
        (folder / "training_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")

    save_folder_atomic(write, target)
    log.info("Saved the model at step %d to %s", step, target)
    return target


def save_lora_model(config: DreamBoothConfig, parts: Components, unet, text_encoder,
                    step: int, seed: int, plan: StepPlan, data: TrainingData) -> Path:
    """Write the LoRA file, its params and training info into ``<model dir>/lora``, each
    file atomically (the folder may hold the user's other files, so it is not swapped)."""
    path = lora_file_path(config)
    state = kohya_state_dict(unet, text_encoder if config.train_text_encoder else None)
    meta = lora_metadata(config, unet, steps=step, epochs=plan.epochs, seed=seed,
                         instance_prompts=[e.prompt for e in data.instance],
                         num_class_images=sum(map(len, data.classes.values())),
                         prediction_type=parts.prediction_type)
    save_lora(path, state, meta)
    save_params(config, path.parent / "params.json")
    info = _training_info(config, step, seed, plan, ema=False)
    info["lora_file"] = path.name
    write_text_atomic(path.parent / "training_info.json", json.dumps(info, indent=2))
    log.info("Saved the LoRA at step %d to %s (%.1f MB)", step, path, path.stat().st_size / 1e6)
    return path.parent


def _training_info(config: DreamBoothConfig, step: int, seed: int, plan: StepPlan, *,
                   ema: bool) -> dict:
    return {"base_model": config.base_model, "steps": step, "total_steps": plan.total_steps,
            "epochs": plan.epochs, "seed": seed, "ema": ema, "lora": config.use_lora,
            "instance_prompts": [c.instance_prompt for c in config.concepts_list],
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


__all__ = ["save_lora_model", "save_model"]
