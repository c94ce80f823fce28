"""Preview samples during a run: each concept sampled with the model as it is now."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.generation.sample import (
    concept_sample_jobs,
    generate_samples,
    image_grid,
    save_images,
)
from colab_dreambooth.models.loading import Components
from colab_dreambooth.models.pipelines import pipeline_from_components

log = logging.getLogger(__name__)


@torch.no_grad()
def preview_samples(accelerator, config: DreamBoothConfig, parts: Components, unet,
                    text_encoder, tag: str) -> Path | None:
    """Sample each concept with the model as it is now; save PNGs and a labelled grid under
    ``<model dir>/samples`` named after ``tag`` (e.g. ``epoch-0003``). Returns the grid's path."""

    if not accelerator.is_main_process:
        return None
    unet, text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
    was_training = unet.training, text_encoder.training
    # The VAE and frozen text encoders may wait on the CPU (cached latents and prompts).
    vae_device = next(parts.vae.parameters()).device
    text_device = next(text_encoder.parameters()).device
    parts.vae.to(accelerator.device)
    text_encoder.to(accelerator.device)
    pipe = pipeline_from_components(parts, unet=unet, text_encoder=text_encoder)
    images, labels = [], []
    autocast = torch.autocast(accelerator.device.type,
                              enabled=accelerator.mixed_precision != "no",
                              dtype=torch.bfloat16 if accelerator.mixed_precision == "bf16"
                              else torch.float16)
    for index in range(len(config.concepts_list)):
        # The same prompts, seeds and rules as the sample stage after training.
        for job in concept_sample_jobs(config, index):
            with autocast:
                images += generate_samples(
                    pipe, job.prompt, n=1, seed=job.seed, negative_prompt=job.negative_prompt,
                    guidance_scale=job.guidance_scale, steps=job.steps,
                    height=job.height or config.resolution, width=job.width or config.resolution,
                    progress=False, clip_skip=config.clip_skip,
                    max_token_length=config.max_token_length)
            labels.append(job.prompt)
    unet.train(was_training[0])
    text_encoder.train(was_training[1])
    parts.vae.to(vae_device)
    text_encoder.to(text_device)
    if not images:
        return None
    out = config.model_dir / "samples"
    save_images(images, out, tag)
    grid = out / f"{tag}-grid.png"
    image_grid(images, labels).save(grid)
    log.info("Preview samples (%s): %s", tag, grid)
    return grid


__all__ = ["preview_samples"]
