"""The noise side of a training step: which scheduler noises the latents, offset noise, and
min-SNR-gamma loss weights.

All three training schedulers the extension offers (DDPM, DEIS, UniPC) describe the same
variance-preserving process through the model's beta schedule, so noisy latents and velocity
targets are computed here from ``alphas_cumprod`` directly: ``x_t = sqrt(a) x_0 + sqrt(1-a) n``
and ``v = sqrt(a) n - sqrt(1-a) x_0``. (diffusers' DEIS/UniPC ``add_noise`` looks sigmas up in
reverse order until ``set_timesteps`` is called, which would train every step at the wrong
noise level; the closed form has no such state.)
"""

from __future__ import annotations

import torch

from colab_dreambooth.config.settings import NOISE_SCHEDULERS


def make_noise_scheduler(name: str, scheduler_config: dict):
    """The training scheduler ``name`` built from the model's own scheduler config, so beta
    schedule and prediction type (epsilon or v-prediction) are the model's."""
    from diffusers import DDPMScheduler, DEISMultistepScheduler, UniPCMultistepScheduler

    classes = {"DDPM": DDPMScheduler, "DEIS": DEISMultistepScheduler,
               "UniPC": UniPCMultistepScheduler}
    if name not in classes:
        raise ValueError(f"unknown noise scheduler {name!r}: choose one of "
                         + ", ".join(NOISE_SCHEDULERS))
    return classes[name].from_config(dict(scheduler_config))


def sample_noise(latents: torch.Tensor, offset_noise: float = 0.0) -> torch.Tensor:
    """Gaussian noise like ``latents``, plus ``offset_noise`` times one random value per image
    and channel (Cross Labs' offset noise: lets the model learn to change an image's overall
    brightness, so very dark or bright images become possible)."""
    noise = torch.randn_like(latents)
    if offset_noise:
        shape = latents.shape[:2] + (1,) * (latents.dim() - 2)
        noise = noise + offset_noise * torch.randn(shape, device=latents.device,
                                                   dtype=latents.dtype)
    return noise


def _alphas(noise_scheduler, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``alphas_cumprod`` at ``timesteps``, shaped to broadcast over ``like``."""
    a = noise_scheduler.alphas_cumprod.to(device=timesteps.device)[timesteps]
    return a.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def add_noise(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor,
              timesteps: torch.Tensor) -> torch.Tensor:
    """The forward process: ``sqrt(a_t) x_0 + sqrt(1 - a_t) noise``."""
    a = _alphas(noise_scheduler, timesteps, latents)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def velocity(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor,
             timesteps: torch.Tensor) -> torch.Tensor:
    """The v-prediction target: ``sqrt(a_t) noise - sqrt(1 - a_t) x_0``."""
    a = _alphas(noise_scheduler, timesteps, latents)
    return a.sqrt() * noise - (1 - a).sqrt() * latents


def snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``a_t / (1 - a_t)`` at each timestep."""
    a = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    a = a[timesteps]
    return a / (1 - a)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-image loss weights of Min-SNR-gamma (Hang et al. 2023, arXiv:2303.09556).

    Epsilon models: ``min(SNR, gamma) / SNR``; v-prediction models: ``min(SNR, gamma) /
    (SNR + 1)`` (the same weighting expressed for the velocity loss, as in diffusers' and
    kohya's scripts). Low-noise steps, whose easy loss would dominate, are weighted down.
    """
    ratio = snr(noise_scheduler, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (ratio + 1)
    return clipped / ratio
