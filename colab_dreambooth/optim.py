"""Optimizer, learning-rate schedule, EMA and memory-attention choices for the training loop."""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import Iterable

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepPlan:
    """How many optimizer steps make an epoch and the run."""

    steps_per_epoch: int
    total_steps: int
    epochs: int


def plan_steps(batches_per_epoch: int, gradient_accumulation_steps: int,
               max_train_steps: int | None, num_train_epochs: int | None) -> StepPlan:
    """Training Steps win over Training Epochs; epochs are then as many as the steps need."""
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / gradient_accumulation_steps))
    if max_train_steps:
        return StepPlan(steps_per_epoch, max_train_steps,
                        math.ceil(max_train_steps / steps_per_epoch))
    if not num_train_epochs:
        raise ValueError("set Training Steps or Training Epochs")
    return StepPlan(steps_per_epoch, steps_per_epoch * num_train_epochs, num_train_epochs)


def make_optimizer(param_groups: list[dict], *, use_8bit: bool | None, on_cuda: bool,
                   betas: tuple[float, float], weight_decay: float,
                   eps: float) -> torch.optim.Optimizer:
    """AdamW, 8-bit (bitsandbytes) when asked for and possible, else torch's with a warning.

    ``use_8bit=None`` means "when a CUDA GPU and bitsandbytes are present".
    """
    have_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if use_8bit is None:
        use_8bit = on_cuda and have_bnb
    if use_8bit and not on_cuda:
        log.warning("8-bit Adam needs a CUDA GPU: using torch AdamW instead")
    elif use_8bit and not have_bnb:
        log.warning("8-bit Adam needs bitsandbytes (pip install 'colab-dreambooth[cuda]'): "
                    "using torch AdamW instead, which takes about 2 GB more VRAM on SD 1.5")
    elif use_8bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups, betas=betas, weight_decay=weight_decay, eps=eps)
    return torch.optim.AdamW(param_groups, betas=betas, weight_decay=weight_decay, eps=eps)


def make_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int,
                      total_steps: int, cycles: int, power: float):
    """The named schedule from diffusers, counted in optimizer steps."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps,
                         num_training_steps=total_steps, num_cycles=cycles, power=power)


class EMA:
    """Exponential moving average of some parameters, optionally kept on the CPU.

    The decay warms up as ``(1 + step) / (10 + step)`` (capped at ``max_decay``) so a short
    DreamBooth run is not dominated by the base weights.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], max_decay: float,
                 device: torch.device | str | None = None):
        self.max_decay = max_decay
        self.shadow = [p.detach().to(device or p.device, dtype=torch.float32, copy=True)
                       for p in parameters]
        self.updates = 0

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Move the average towards the current ``parameters``."""
        self.updates += 1
        decay = min(self.max_decay, (1 + self.updates) / (10 + self.updates))
        for shadow, param in zip(self.shadow, parameters):
            shadow.lerp_(param.detach().to(shadow.device, torch.float32), 1 - decay)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Write the averaged weights into ``parameters``."""
        for shadow, param in zip(self.shadow, parameters):
            param.copy_(shadow.to(param.device, param.dtype))

    def state_dict(self) -> dict:
        """Everything needed to continue the average."""
        return {"shadow": self.shadow, "updates": self.updates, "max_decay": self.max_decay}


def set_memory_attention(unet, choice: str, on_cuda: bool) -> str:
    """Apply the Memory Attention choice to ``unet``; return what is actually used."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if choice == "xformers":
        if not on_cuda:
            log.warning("xformers needs a CUDA GPU: using PyTorch scaled-dot-product attention")
        elif importlib.util.find_spec("xformers") is None:
            log.warning("xformers is not installed (pip install 'colab-dreambooth[cuda]'): "
                        "using PyTorch scaled-dot-product attention, which needs about as "
                        "little memory")
        else:
            try:
                unet.enable_xformers_memory_efficient_attention()
                return "xformers"
            except Exception as exc:  # a wheel built for another torch fails only here
                log.warning("xformers could not be used (%s): using PyTorch scaled-dot-product "
                            "attention", exc)
    # PyTorch SDPA picks its flash or memory-efficient kernel where the GPU and dtype allow,
    # which is what "flash_attention" asks for.
    unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"
