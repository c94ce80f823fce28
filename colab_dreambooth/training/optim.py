"""The optimizer and learning-rate schedule of a run, its step plan, and the EMA of the weights."""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch

from colab_dreambooth.errors import UserError
from colab_dreambooth.runtime.packages import (
    INSTALL_HINT,
    OPTIMIZER_PACKAGES,
    importable,
    missing_package_message,
)
from colab_dreambooth.training.memory import GIB, OPTIMIZER_BYTES

if TYPE_CHECKING:
    from colab_dreambooth.config.settings import DreamBoothConfig

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


# bitsandbytes has 8-bit versions of these two only.
EIGHT_BIT = {"AdamW": "AdamW8bit", "Lion": "Lion8bit"}


class OptimizerUnavailable(UserError, ImportError):
    """The chosen optimizer's package is not installed; the message says what to install."""


def optimizer_class(name: str) -> type:
    """The class of optimizer ``name`` (AdamW, Lion, Prodigy or Adafactor), imported now.

    Raises :class:`OptimizerUnavailable` naming the package to install when it is missing.
    """
    if name == "AdamW":
        return torch.optim.AdamW
    if name not in OPTIMIZER_PACKAGES:
        raise ValueError(f"unknown optimizer {name!r}: choose one of AdamW, "
                         + ", ".join(OPTIMIZER_PACKAGES))
    module, attr, package = OPTIMIZER_PACKAGES[name]
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise OptimizerUnavailable(missing_package_message(name)) from exc


def make_optimizer(param_groups: list[dict], name: str = "AdamW", *, use_8bit: bool | None,
                   on_cuda: bool, betas: tuple[float, float], weight_decay: float,
                   eps: float, warmup_steps: int = 0) -> torch.optim.Optimizer:
    """The Optimizer field's choice over ``param_groups`` (each group carries its ``lr``).

    AdamW and Lion run 8-bit (bitsandbytes) when ``use_8bit`` asks for it and a CUDA GPU and
    bitsandbytes are present, else in 32 bit with a warning; ``use_8bit=None`` means "when a
    CUDA GPU and bitsandbytes are present" (AdamW only: Lion 8-bit is asked for explicitly).
    ``weight_decay`` may be overridden per group (the text encoder's own decay).
    Raises :class:`OptimizerUnavailable` when the chosen optimizer's package is missing.
    """
    cls = optimizer_class(name)  # fails before bitsandbytes is looked at
    trained = sum(p.numel() for group in param_groups for p in group["params"])
    if name in EIGHT_BIT and _eight_bit_usable(name, use_8bit, on_cuda, trained):
        import bitsandbytes as bnb

        eight_bit = getattr(bnb.optim, EIGHT_BIT[name])
        if name == "AdamW":
            return eight_bit(param_groups, betas=betas, weight_decay=weight_decay, eps=eps)
        return eight_bit(param_groups, betas=betas, weight_decay=weight_decay)
    if use_8bit and name not in EIGHT_BIT:  # also a GPU preset's choice: no warning
        log.info("Use 8bit Adam has no effect on %s (bitsandbytes has no 8-bit %s)", name, name)
    if name == "AdamW":
        # On a GPU the fused kernel: torch's default (foreach) step holds a temporary as large
        # as the trained weights (~3.2 GB for SD 1.5's UNet), which the memory estimate does
        # not count and a T4 does not have; fused is also the fastest. On the CPU too (torch
        # 2.4+): one pass over the weights instead of foreach's ten, 4x faster for the tiny
        # model (its optimizer step was a third of the training step), equal to within float
        # rounding. Where this torch has no fused kernel for the CPU, foreach.
        try:
            return cls(param_groups, betas=betas, weight_decay=weight_decay, eps=eps,
                       fused=True)
        except RuntimeError:
            if on_cuda:
                raise
            return cls(param_groups, betas=betas, weight_decay=weight_decay, eps=eps,
                       foreach=True)
    if name == "Lion":
        # lion-pytorch's decay is lr x weight_decay like AdamW's, so the same value means the
        # same pull; Lion's own paper uses 3-10x the AdamW decay with a 3-10x smaller lr.
        return cls(param_groups, betas=betas, weight_decay=weight_decay)
    if name == "Prodigy":
        # d0 1e-6 and no bias correction are Prodigy's defaults (and the extension's); with a
        # warm-up, safeguard_warmup keeps the small early learning rates from inflating d.
        return cls(param_groups, betas=betas, eps=eps, weight_decay=weight_decay,
                   decouple=True, safeguard_warmup=warmup_steps > 0, d0=1e-6)
    # Adafactor as the extension runs it: the learning rate as given (so every LR scheduler
    # works), update clipping at 1.0, parameter-scaled steps, no first moment (least memory).
    return cls(param_groups, lr=param_groups[0]["lr"], weight_decay=weight_decay,
               clip_threshold=1.0, decay_rate=-0.8, relative_step=False, scale_parameter=True,
               warmup_init=False)


def _eight_bit_usable(name: str, use_8bit: bool | None, on_cuda: bool, trained: int) -> bool:

    have_bnb = importable("bitsandbytes")
    if use_8bit is None:
        return name == "AdamW" and on_cuda and have_bnb
    label = "Adam" if name == "AdamW" else name
    if use_8bit and not on_cuda:
        log.warning("8-bit %s needs a CUDA GPU: using torch %s instead", label, name)
    elif use_8bit and not have_bnb:
        # The memory estimator's own figure: the state bytes per weight of each form.
        key = name.lower()
        extra = trained * (OPTIMIZER_BYTES[key] - OPTIMIZER_BYTES[key + "8bit"]) / GIB
        log.warning("8-bit %s needs bitsandbytes, which does not import here (%s): using the "
                    "32-bit %s instead, whose states take %.1f GB more GPU memory for these "
                    "%.0fM weights", label, INSTALL_HINT, name, extra, trained / 1e6)
    return bool(use_8bit) and on_cuda and have_bnb


def make_training_optimizer(config: "DreamBoothConfig", unet: torch.nn.Module,
                            text_encoder: torch.nn.Module, *, total_steps: int, processes: int = 1,
                            on_cuda: bool = False):
    """The run's optimizer over what trains (the UNet's weights, and the text encoder's with
    Train Text Encoder, each group with its own learning rate and the text encoder's own
    weight decay) and its learning-rate schedule. Returns ``(optimizer, lr_scheduler)``.

    Scale learning rate multiplies the rates by processes x accumulation x batch size. The
    schedule counts every process's scheduler steps (accelerate steps it once per process).
    """
    scale = (processes * config.gradient_accumulation_steps
             * config.train_batch_size) if config.scale_lr else 1
    unet_lr, text_lr = ((config.lora_learning_rate, config.lora_txt_learning_rate)
                        if config.use_lora else
                        (config.learning_rate, config.text_encoder_learning_rate))
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad],
               "lr": unet_lr * scale}]
    if config.train_text_encoder:
        groups.append({"params": [p for p in text_encoder.parameters() if p.requires_grad],
                       "lr": text_lr * scale})
        if config.tenc_weight_decay is not None:
            groups[-1]["weight_decay"] = config.tenc_weight_decay
    optimizer = make_optimizer(groups, config.optimizer, use_8bit=config.use_8bit_adam,
                               on_cuda=on_cuda, betas=(config.adam_beta1, config.adam_beta2),
                               weight_decay=config.weight_decay, eps=config.adam_epsilon,
                               warmup_steps=config.lr_warmup_steps)
    lr_scheduler = make_lr_scheduler(
        config.lr_scheduler, optimizer, warmup_steps=config.lr_warmup_steps * processes,
        total_steps=total_steps * processes, cycles=config.lr_cycles, power=config.lr_power)
    return optimizer, lr_scheduler


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


