"""GPU presets: the memory and speed settings that suit each GPU class, as one table of data.

A preset fills only the fields the user left blank (None, "auto") — mixed precision, 8-bit
Adam, gradient checkpointing, attention, latent caching, batch size and text-encoder training —
so that Stable Diffusion 1.5 at 512 px fits with a margin, and says why it chose each value.
Every row was sized with :func:`colab_dreambooth.training.memory.estimate_peak_memory` (the tests
check that each row's estimate stays under 85% of its GPU's memory, with prior preservation on).

SDXL (the ``family`` a caller passes: what
:func:`~colab_dreambooth.models.families.detect_family` reads from the base model) at
1024 px has a UNet three times SD 1.5's and about seven times its activations per image: each
row's ``sdxl`` and ``sdxl_lora`` maps replace the values that must differ
(gradient checkpointing, smaller batches, 8-bit Adam, the UNet alone), each with its reason.
Full fine-tuning of SDXL does not fit GPUs under ~32 GB: those rows say to turn on Use LORA.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from colab_dreambooth.config.fields import preset_fields
from colab_dreambooth.config.settings import SD, SDXL, DreamBoothConfig
from colab_dreambooth.runtime.device import DeviceInfo, detect_device

# The fields a preset decides, in the order its table shows them (each declares its column).
PRESET_FIELDS = preset_fields(DreamBoothConfig)

_FP16 = ("fp16", "no bf16 on this GPU; fp16 runs on its tensor cores")
_BF16 = ("bf16", "bf16 tensor cores: fp16's speed without its overflow risk")
_8BIT = (True, "8-bit AdamW states: 2 bytes per weight instead of 8 (about 5 GB less on SD 1.5)")
_EXACT_ADAM = (False, "memory to spare: exact fp32 AdamW states")
_CHECKPOINT = (True, "recompute activations in the backward pass: ~1 GB per image less, "
                     "~25% slower")
_NO_CHECKPOINT = (False, "memory to spare: no recomputation, ~25% faster steps")
_SDPA = ("default", "PyTorch scaled-dot-product attention (memory-efficient kernel)")
_FLASH = ("flash_attention", "PyTorch's flash-attention kernel runs on this GPU")
_CACHE = (True, "encode the images once, not every step; the VAE leaves the GPU")
_TEXT = (True, "training CLIP too gives better faces, and it fits")
# LoRA keeps the base frozen in fp16/bf16 and trains a few MB of adapters: the optimizer
# needs no saving, and the memory that frees goes to larger batches.
_LORA_ADAM = (False, "LoRA: the adapters' optimizer states are a few MB")


def _batch(n: int, why: str = "") -> tuple[int, str]:
    return n, why or f"{n} instance image(s) per step (x2 with class images) fits with margin"


# SDXL at 1024 px (memory.py's calibration): ~9 GB of activations per image without
# recomputing them, ~0.75 GB with; a 2.6 B-parameter UNet (4.8 GB in fp16, 9.6 GB in fp32).
_SDXL_CHECKPOINT = (True, "SDXL at 1024 px keeps ~9 GB of activations per image: recompute "
                          "them (~0.75 GB), ~25% slower")
_SDXL_8BIT = (True, "SDXL's 2.6 B-parameter UNet: 8-bit AdamW states save ~14 GB")
_SDXL_NO_FULL = {
    "gradient_checkpointing": _SDXL_CHECKPOINT,
    "train_batch_size": _batch(1, "SDXL: 1 image per step"),
    "train_text_encoder": (False, "full fine-tuning of SDXL (a 2.6 B-parameter UNet) does not "
                                  "fit this GPU even for the UNet alone: turn on Use LORA"),
}
_SDXL_UNET_ONLY = (False, "SDXL: both text encoders (818 M weights) trained too would not fit; "
                          "the UNet alone (or turn on Use LORA to train both)")


def _sdxl_batch(n: int) -> tuple[int, str]:
    return _batch(n, f"SDXL at 1024 px: {n} instance image(s) per step (x2 with class "
                     "images) fits with margin")


@dataclass(frozen=True)
class Preset:
    """One GPU class and what suits it.

    ``pattern`` matches the GPU's name as CUDA reports it (None: matched by memory only);
    ``memory_gb`` is the memory (GiB, as PyTorch reports it) the values were sized for;
    ``values`` maps each field of :data:`PRESET_FIELDS` to (value, reason); ``lora_values``
    replaces some of them when Use LORA is on; for an SDXL model ``sdxl_values`` then replaces
    some (full fine-tuning) and ``sdxl_lora_values`` (Use LORA).
    """

    name: str
    label: str
    pattern: str | None
    memory_gb: float
    values: Mapping[str, tuple[Any, str]]
    lora_values: Mapping[str, tuple[Any, str]] = field(default_factory=dict)
    sdxl_values: Mapping[str, tuple[Any, str]] = field(default_factory=dict)
    sdxl_lora_values: Mapping[str, tuple[Any, str]] = field(default_factory=dict)

    def matches(self, gpu_name: str) -> bool:
        """True when ``gpu_name`` ("Tesla T4", "NVIDIA A100-SXM4-40GB", ...) is this class."""
        return bool(self.pattern and re.search(self.pattern, gpu_name, re.IGNORECASE))


@dataclass(frozen=True)
class Choice:
    """The value one preset field ends up with, and why."""

    field: str
    value: Any
    reason: str
    from_preset: bool  # False: the user set it


def _row(name: str, label: str, pattern: str | None, memory_gb: float, *, precision,
         adam, checkpoint, attention, batch, text=_TEXT, lora=None, sdxl=None,
         sdxl_lora=None) -> Preset:
    values = {"mixed_precision": precision, "use_8bit_adam": adam,
              "gradient_checkpointing": checkpoint, "attention": attention,
              "cache_latents": _CACHE, "train_batch_size": batch, "train_text_encoder": text}
    return Preset(name, label, pattern, memory_gb, values, lora or {}, sdxl or {},
                  sdxl_lora or {})


_SDXL_LARGE = {"gradient_checkpointing": _SDXL_CHECKPOINT, "train_batch_size": _sdxl_batch(4)}
_SDXL_LARGE_LORA = {"train_batch_size": _sdxl_batch(2)}

# Sized with memory.estimate_peak_memory for SD 1.5 at 512 px with prior preservation (two
# rows per instance image), and the sdxl maps for SDXL at 1024 px (LoRA rank 32); "GB" are
# GiB as torch reports them (a 16 GB card shows ~15).
PRESETS: tuple[Preset, ...] = (
    _row("CPU", "CPU only", None, 0.0,
         precision=("no", "the CPU trains in fp32"),
         adam=(False, "8-bit Adam needs a CUDA GPU"),
         checkpoint=(False, "host memory is ample; recomputing would only slow the CPU"),
         attention=_SDPA, batch=_batch(1, "1 image per step: the CPU is slow enough")),
    _row("small", "GPU under 12 GB", None, 7.5,
         precision=_FP16, adam=_8BIT, checkpoint=_CHECKPOINT, attention=_SDPA, batch=_batch(1),
         text=(False, "full fine-tuning barely fits: UNet only (or turn on Use LORA)"),
         lora={"use_8bit_adam": _LORA_ADAM,
               "train_text_encoder": (True, "LoRA: text-encoder adapters cost almost nothing"),
               "train_batch_size": _batch(2)},
         sdxl=_SDXL_NO_FULL,
         sdxl_lora={"gradient_checkpointing": _SDXL_CHECKPOINT,
                    "train_batch_size": _sdxl_batch(1),
                    "train_text_encoder": (False, "SDXL: its two text encoders' activations "
                                                  "do not fit 8 GB; the UNet's adapters only")}),
    _row("T4", "NVIDIA T4, 16 GB", r"\bT4\b", 14.7,
         precision=_FP16, adam=_8BIT, checkpoint=_CHECKPOINT, attention=_SDPA,
         batch=_batch(1, "1 image per step keeps text-encoder training under ~11 GB"),
         lora={"use_8bit_adam": _LORA_ADAM,
               "gradient_checkpointing": (False, "LoRA: activations fit without recomputing"),
               "train_batch_size": _batch(2)},
         sdxl=_SDXL_NO_FULL,
         sdxl_lora={"gradient_checkpointing": _SDXL_CHECKPOINT,
                    "train_batch_size": _sdxl_batch(1)}),
    _row("V100-16", "NVIDIA V100, 16 GB", r"\bV100", 15.7,
         precision=_FP16, adam=_8BIT, checkpoint=_CHECKPOINT, attention=_SDPA, batch=_batch(1),
         lora={"use_8bit_adam": _LORA_ADAM,
               "gradient_checkpointing": (False, "LoRA: activations fit without recomputing"),
               "train_batch_size": _batch(2)},
         sdxl=_SDXL_NO_FULL,
         sdxl_lora={"gradient_checkpointing": _SDXL_CHECKPOINT,
                    "train_batch_size": _sdxl_batch(1)}),
    _row("L4", "NVIDIA L4, 24 GB", r"\bL4\b", 22.0,
         precision=_BF16, adam=_8BIT, checkpoint=_NO_CHECKPOINT, attention=_FLASH,
         batch=_batch(2),
         lora={"use_8bit_adam": _LORA_ADAM, "train_batch_size": _batch(4)},
         sdxl=_SDXL_NO_FULL,
         sdxl_lora={"gradient_checkpointing": _SDXL_CHECKPOINT,
                    "train_batch_size": _sdxl_batch(2)}),
    _row("V100-32", "NVIDIA V100, 32 GB", r"\bV100", 31.7,
         precision=_FP16, adam=_EXACT_ADAM, checkpoint=_NO_CHECKPOINT, attention=_SDPA,
         batch=_batch(2),
         lora={"use_8bit_adam": _LORA_ADAM, "train_batch_size": _batch(4)},
         sdxl={"use_8bit_adam": _SDXL_8BIT, "gradient_checkpointing": _SDXL_CHECKPOINT,
               "train_batch_size": _sdxl_batch(1), "train_text_encoder": _SDXL_UNET_ONLY},
         sdxl_lora={"gradient_checkpointing": _SDXL_CHECKPOINT,
                    "train_batch_size": _sdxl_batch(4)}),
    _row("A100-40", "NVIDIA A100, 40 GB", r"\bA100\b", 39.4,
         precision=_BF16, adam=_EXACT_ADAM, checkpoint=_NO_CHECKPOINT, attention=_FLASH,
         batch=_batch(4),
         lora={"use_8bit_adam": _LORA_ADAM, "train_batch_size": _batch(8)},
         sdxl={"use_8bit_adam": _SDXL_8BIT, "gradient_checkpointing": _SDXL_CHECKPOINT,
               "train_batch_size": _sdxl_batch(2), "train_text_encoder": _SDXL_UNET_ONLY},
         sdxl_lora={"train_batch_size": _sdxl_batch(1)}),
    _row("A100-80", "NVIDIA A100, 80 GB", r"\bA100\b", 79.1,
         precision=_BF16, adam=_EXACT_ADAM, checkpoint=_NO_CHECKPOINT, attention=_FLASH,
         batch=_batch(8),
         lora={"use_8bit_adam": _LORA_ADAM, "train_batch_size": _batch(16)},
         sdxl=_SDXL_LARGE, sdxl_lora=_SDXL_LARGE_LORA),
    _row("H100", "NVIDIA H100/H200, 80 GB+", r"\bH[12]00\b", 79.1,
         precision=_BF16, adam=_EXACT_ADAM, checkpoint=_NO_CHECKPOINT, attention=_FLASH,
         batch=_batch(8),
         lora={"use_8bit_adam": _LORA_ADAM, "train_batch_size": _batch(16)},
         sdxl=_SDXL_LARGE, sdxl_lora=_SDXL_LARGE_LORA),
)
PRESETS_BY_NAME = {p.name: p for p in PRESETS}
# A card reports a little less than its label (a "16 GB" T4 shows 14.7-15.0 GiB).
_MEMORY_SLACK_GB = 1.0


def choose_preset(device: DeviceInfo) -> Preset:
    """The preset for ``device``: by GPU name first (the row whose memory fits, e.g. V100 16
    or 32 GB), else the largest row whose memory the GPU has; "CPU" without a GPU."""
    if device.kind != "cuda":
        return PRESETS_BY_NAME["CPU"]
    gpu_rows = [p for p in PRESETS if p.name != "CPU"]
    fits = [p for p in gpu_rows if p.memory_gb <= device.memory_gb + _MEMORY_SLACK_GB]
    named = [p for p in fits if p.matches(device.name)]
    if named:
        return max(named, key=lambda p: p.memory_gb)
    by_name = [p for p in gpu_rows if p.matches(device.name)]
    if by_name:  # a known GPU reporting less memory than expected (e.g. capped): its smallest
        return min(by_name, key=lambda p: p.memory_gb)
    return max(fits, key=lambda p: p.memory_gb) if fits else PRESETS_BY_NAME["small"]


def preset_for(config: DreamBoothConfig, device: DeviceInfo) -> Preset:
    """The preset a run of ``config`` on ``device`` uses ("CPU" with Use CPU Only)."""
    return PRESETS_BY_NAME["CPU"] if config.use_cpu else choose_preset(device)


def preset_values(preset: Preset, device: DeviceInfo, *, lora: bool = False,
                  family: str = SD) -> dict[str, tuple[Any, str]]:
    """The preset's (value, reason) per field for a model of ``family`` ("SD" or "SDXL"),
    fitted to what ``device`` can do: bf16 becomes fp16 on a GPU without bf16, flash attention
    the default kernel where it cannot run."""
    values = dict(preset.values)
    if lora:
        values.update(preset.lora_values)
    if family == SDXL:
        values.update(preset.sdxl_lora_values if lora else preset.sdxl_values)
    if device.kind == "cuda":
        if values["mixed_precision"][0] == "bf16" and not device.bf16:
            values["mixed_precision"] = _FP16
        elif values["mixed_precision"][0] == "fp16" and device.bf16:
            values["mixed_precision"] = _BF16  # e.g. a 16 GB card newer than the T4
        if values["attention"][0] == "flash_attention" and not device.flash_attention:
            values["attention"] = _SDPA
        elif values["attention"][0] == "default" and device.flash_attention:
            values["attention"] = _FLASH
    return values


def apply_preset(config: DreamBoothConfig, device: DeviceInfo, preset: Preset | None = None,
                 *, family: str = SD) -> tuple[DreamBoothConfig, list[Choice]]:
    """``config`` with every blank preset field filled from ``preset`` (the device's own by
    default) for a model of ``family`` (``detect_family(config.base_model)``), and one
    :class:`Choice` per preset field saying what it is and why. Fields the user set are kept:
    their choice wins."""
    if config.use_cpu:
        device = DeviceInfo.cpu()
    preset = preset or preset_for(config, device)
    values = preset_values(preset, device, lora=bool(config.use_lora), family=family)
    changes, choices = {}, []
    for name in PRESET_FIELDS:
        current = getattr(config, name)
        if current is None:
            value, reason = values[name]
            changes[name] = value
            choices.append(Choice(name, value, reason, True))
        else:
            choices.append(Choice(name, current, "set by you", False))
    return (config.copy(**changes) if changes else config), choices


def resolve_auto(config: DreamBoothConfig, device: DeviceInfo | None = None, *,
                 family: str = SD) -> DreamBoothConfig:
    """``config`` with its blank preset fields filled for ``device`` (detected when None) and
    a model of ``family``."""
    if device is None:
        device = DeviceInfo.cpu() if config.use_cpu else detect_device()
    return apply_preset(config, device, family=family)[0]


def format_choices(choices: list[Choice], preset: Preset | None = None) -> str:
    """A plain-text table of the preset fields: value, who chose it, and why."""
    title = f"Preset: {preset.name} ({preset.label})" if preset else "Preset"
    rows = [(c.field, _show(c.value), "preset" if c.from_preset else "yours", c.reason)
            for c in choices]
    widths = [max(len(r[i]) for r in rows + [("field", "value", "by", "")]) for i in range(3)]
    lines = [title, f"  {'field':{widths[0]}}  {'value':{widths[1]}}  {'by':{widths[2]}}  why"]
    lines += [f"  {a:{widths[0]}}  {b:{widths[1]}}  {c:{widths[2]}}  {d}" for a, b, c, d in rows]
    return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def describe_presets() -> str:
    """The whole table as Markdown (for the README and ``colab-dreambooth env --all``)."""
    head = "| preset | GPU | " + " | ".join(PRESET_FIELDS) + " |"
    lines = [head, "|" + "---|" * (len(PRESET_FIELDS) + 2)]
    for p in PRESETS:
        cells = [_show(p.values[name][0]) for name in PRESET_FIELDS]
        lines.append(f"| {p.name} | {p.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["Choice", "PRESETS", "PRESETS_BY_NAME", "PRESET_FIELDS", "Preset", "SD", "SDXL",
           "apply_preset",
           "choose_preset", "describe_presets", "format_choices", "preset_for", "preset_values",
           "resolve_auto"]

