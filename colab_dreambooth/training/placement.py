"""The models made ready to train: what trains, in which dtype, on which device, with which
memory savers.

Frozen parts (the VAE, a text encoder that does not train, a LoRA run's base weights) sit in
the compute dtype (fp16/bf16 under mixed precision); trained weights stay fp32 unless Half model
asks for them in fp16/bf16. :func:`place_models` is called by ``train()`` and by
``benchmarks/gpu_train.py`` alike, so the benchmark measures what a run does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from colab_dreambooth.errors import ConfigError, Problem
from colab_dreambooth.models.attention import set_memory_attention
from colab_dreambooth.models.lora import add_lora
from colab_dreambooth.models.text_encoding import (
    DualTextEncoder,
    freeze_final_layer_norm,
    num_text_layers,
    unused_text_modules,
)
from colab_dreambooth.runtime.device import DeviceInfo
from colab_dreambooth.training.numerics import half_model_dtype

if TYPE_CHECKING:
    from accelerate import Accelerator

    from colab_dreambooth.config.settings import DreamBoothConfig

log = logging.getLogger(__name__)

_COMPUTE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class PlacedModels:
    """The UNet, text encoder and VAE as training uses them."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    weight_dtype: torch.dtype  # the frozen parts' dtype: the compute dtype
    half: torch.dtype | None  # Half model: the trained weights' own dtype, else None (fp32)
    vae_dtype: torch.dtype = torch.float32  # the compute dtype, or fp32 for a VAE that needs it


def make_accelerator(config: "DreamBoothConfig", device: DeviceInfo) -> "Accelerator":
    """The run's Accelerator: mixed precision where a GPU runs it, gradient accumulation."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=mixed_precision(config, device),
                       gradient_accumulation_steps=config.gradient_accumulation_steps,
                       cpu=config.use_cpu)


def mixed_precision(config: "DreamBoothConfig", device: DeviceInfo) -> str:
    """Mixed Precision as it can run on ``device``: "no" (with a warning) off a GPU."""
    if config.mixed_precision != "no" and (config.use_cpu or device.kind != "cuda"):
        log.warning("Mixed precision %s needs a GPU: training on the CPU in fp32",
                    config.mixed_precision)
        return "no"
    return config.mixed_precision


def compute_dtype(accelerator: "Accelerator") -> torch.dtype:
    """The dtype of the frozen weights and the forward pass under the run's mixed precision."""
    return _COMPUTE_DTYPES.get(accelerator.mixed_precision, torch.float32)


def place_models(unet: torch.nn.Module, text_encoder: torch.nn.Module, vae: torch.nn.Module,
                 config: "DreamBoothConfig", accelerator: "Accelerator") -> PlacedModels:
    """Freeze what does not train, cast and move each part, add LoRA adapters (Use LORA), and
    set Memory Attention and Gradient checkpointing (blank: on a GPU only).

    Raises :class:`ConfigError` when Clip Skip reaches past the text encoder's layers.
    """
    layers = num_text_layers(text_encoder)
    if config.clip_skip > layers:
        raise ConfigError([Problem("clip_skip", f"{config.clip_skip} is more than the "
                                   f"{layers} layers of this model's text encoder: lower it "
                                   "(1 = the last layer)")])
    on_cuda = accelerator.device.type == "cuda"
    weight_dtype = compute_dtype(accelerator)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(config.train_text_encoder)
    if config.train_text_encoder and config.freeze_clip_normalization:
        freeze_final_layer_norm(text_encoder)
    half = None if config.use_lora else half_model_dtype(config.full_fp16,
                                                         accelerator.mixed_precision)
    for module in (unet, text_encoder) if half else ():
        module.to(dtype=half)  # Half model: the trained weights themselves in fp16/bf16
    if config.use_lora:
        # The frozen base can sit in the compute dtype; only the fp32 adapters train.
        for module in (unet, text_encoder):
            _to(module, accelerator.device, weight_dtype)
        add_lora(unet, text_encoder, config)
    if config.train_text_encoder:
        for module in unused_text_modules(text_encoder, config.clip_skip):
            module.requires_grad_(False)  # no gradient reaches it (adapters included)
    unet.train()
    text_encoder.train(config.train_text_encoder)
    set_memory_attention(unet, config.attention, on_cuda)
    checkpointing = config.gradient_checkpointing
    if checkpointing if checkpointing is not None else on_cuda:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    if not config.train_text_encoder:
        _to(text_encoder, accelerator.device, weight_dtype)
    vae_dtype = vae_compute_dtype(vae, weight_dtype, sdxl=isinstance(text_encoder,
                                                                     DualTextEncoder))
    _to(vae, accelerator.device, vae_dtype)
    return PlacedModels(unet, text_encoder, vae, weight_dtype, half, vae_dtype)


def vae_compute_dtype(vae: torch.nn.Module, weight_dtype: torch.dtype, *, sdxl: bool
                      ) -> torch.dtype:
    """The dtype the VAE encodes in: the compute dtype, except fp32 for SDXL's own VAE, which
    overflows in fp16 (NaN latents, black images; its config says ``force_upcast``, while a
    fixed fp16 VAE such as madebyollin/sdxl-vae-fp16-fix says it does not). bf16 has fp32's
    range; SD 1.x/2.x's VAE is fine in fp16 (diffusers' default ``force_upcast`` is on for
    every VAE, so only SDXL's is taken at its word)."""
    if sdxl and weight_dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        log.info("The VAE encodes in fp32 (it overflows in fp16); a fixed fp16 VAE would halve "
                 "its memory, or Cache latents moves it off the GPU")
        return torch.float32
    return weight_dtype


def _to(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    # Moved first, then cast, and cast only when needed: an fp32 run keeps the loaded tensors.
    module.to(device)
    if dtype != torch.float32:
        module.to(dtype=dtype)


__all__ = ["PlacedModels", "compute_dtype", "make_accelerator", "mixed_precision",
           "place_models"]
