"""An estimate of a run's peak GPU memory, before any model is loaded.

The estimate adds what lives on the GPU at the peak of a training step (the end of the
backward pass): the weights in their dtype, the gradients and optimizer states of what trains,
the EMA copy, the activations kept for the backward pass, the VAE when latents are not cached,
and the CUDA context. Figures are GiB, which the package (like ``nvidia-smi``) calls GB.

Calibration (SD 1.5 at 512 px):

- ShivamShrirao/diffusers, examples/dreambooth/README.md, measured on a Tesla T4 with
  prior preservation (two rows per step at batch 1), xformers, VAE and text encoder off the GPU:
  fp16 + 8-bit Adam + checkpointing 9.92 GB; batch 2 10.4 GB (+0.24 GB per row with
  checkpointing); without checkpointing 11.17 GB, batch 2 13.67 GB (+1.25 GB per row); fp32
  AdamW instead of 8-bit 15.79 GB. Those are ``nvidia-smi`` figures with torch 1.12, whose CUDA
  context (no lazy kernel loading) took ~0.5 GB more than today's; this module gives 9.1 GB for
  that configuration.
- kohya-style fine-tuning on an RTX 4090 (arca.live/b/aiart/77209577): with xformers
  +1.34 GB per image without checkpointing, +0.5 GB with it; without memory-efficient attention
  +7 GB per image (we never run that: the package always uses SDPA or xformers).
- The diffusers DreamBooth README: fine-tuning the text encoder too (fp32 AdamW, prior
  preservation) "needs 24 GB"; this module gives 16-18 GB for it at batch 1 (with and without
  checkpointing): more than a 16 GB card holds, as there.

Calibration (SDXL at 1024 px). SDXL's attention sits at lower resolutions than SD 1.5's (none
at the 128x128 latent; 2 transformer layers per block at 64x64 and 10 at 32x32), so its
activations are not SD 1.5's scaled by width and area. The figures below are SD 1.5's
measured ones times the ratio of what the two UNets keep for the backward pass, counted on the
meta device (diffusers 0.42, fp16, the memory-efficient attention kernel's saved q/k/v/out/lse,
one row): 0.72 GiB for SD 1.5 at 512 px and 4.97 GiB for SDXL at 1024 px without
checkpointing (x6.9); with diffusers' gradient checkpointing (its inputs, what stays outside
it and the largest recomputed block) 0.20 and 0.59 GiB (x3.0). Checked against published
figures (the estimate in brackets):

- kohya-ss/sd-scripts, docs/train_SDXL-en.md: SDXL LoRA "can be done with 8GB GPU memory
  (10GB recommended)" at rank 4-8 with checkpointing, cached latents and cached text-encoder
  outputs [6.2 GB at rank 8: frozen encoders leave the GPU here too once every prompt is
  encoded]; full fine-tuning "can be done with 24GB" at batch 1 with the UNet only,
  checkpointing, cached text-encoder outputs and Adafactor, while "AdamW 8bit doesn't seem
  to work" [20.4 GB with Adafactor, 25.2 GB with 8-bit AdamW].
- bmaltais/kohya_ss issue 2530: the leanest full SDXL DreamBooth (batch 1, UNet only,
  checkpointing, full fp16) "almost 19gb" [15.6 GB with 8-bit AdamW, 17.1 GB with both
  encoders still on the GPU].
- huggingface/diffusers PR 4470 and examples/dreambooth/README_sdxl.md: SDXL LoRA at 1024 px
  "with less than 16GB of VRAM" with checkpointing, 8-bit Adam and fp16 [T4 with prior
  preservation, rank 32: 9.4 GB].
- kohya-ss/sd-scripts issue 1152 and bmaltais/kohya_ss issue 1103: full SDXL with Prodigy
  or 8-bit AdamW runs out of 24 GB; with Adafactor and the UNet alone it fits.

SDXL's VAE runs in fp32 under fp16 (it overflows in fp16: diffusers' ``force_upcast``, kohya's
``--no_half_vae``; bf16 has fp32's range) unless a fixed fp16 VAE's config says otherwise;
without cached latents it encodes 1024 px images, four times SD 1.5's area, in fp32.

The sum is deliberately simple and errs high at batch 1 without checkpointing, where the
backward pass frees activations while it creates gradients.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from colab_dreambooth.config.presets import apply_preset
from colab_dreambooth.config.settings import TINY_MODEL, TINY_SDXL_MODEL
from colab_dreambooth.models.families import SD, SDXL, detect_family, folder_family
from colab_dreambooth.models.lora import uses_conv, uses_dora
from colab_dreambooth.models.tiny import tiny_model_path, tiny_sdxl_model_path
from colab_dreambooth.runtime.device import DeviceInfo
from colab_dreambooth.runtime.packages import INSTALL_HINT, importable
from colab_dreambooth.training.step import prompts_known

if TYPE_CHECKING:
    from colab_dreambooth.config.settings import DreamBoothConfig

log = logging.getLogger(__name__)

GIB = 2**30


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts of a Stable Diffusion model's parts, and its family."""

    unet: int
    text_encoder: int
    vae: int
    label: str
    text_encoder_2: int = 0  # SDXL's second text encoder (OpenCLIP bigG, with projection)
    family: str = SD  # models.families: "SD" or "SDXL"
    vae_fp32: bool = False  # the VAE runs in fp32 (SDXL's overflows in fp16)

    @property
    def text_encoders(self) -> int:
        """Both text encoders together (SD: the one)."""
        return self.text_encoder + self.text_encoder_2


# Exact counts of the published models (diffusers' UNet2DConditionModel, CLIPTextModel,
# CLIPTextModelWithProjection, AutoencoderKL built from their configs).
SD15 = ModelSizes(859_520_964, 123_060_480, 83_653_863, "SD 1.x")
SD2 = ModelSizes(865_910_724, 340_387_840, 83_653_863, "SD 2.x")
SDXL_BASE = ModelSizes(2_567_463_684, 123_060_480, 83_653_863, "SDXL", 694_659_840, SDXL, True)

# Activations kept for the backward pass, GiB per row (image) of SD 1.5 at 512 px in
# fp16/bf16 with memory-efficient attention (see the module docstring for the sources).
ACTIVATIONS_GB = 1.3
ACTIVATIONS_CHECKPOINTED_GB = 0.25
# fp32 activations take about twice as much (autocast already keeps some in fp32).
FP32_ACTIVATION_FACTOR = 2.0
# Flash attention keeps slightly less than the memory-efficient kernel (no padding buffers).
ATTENTION_FACTOR = {"flash_attention": 0.9}
TEXT_ENCODER_ACTIVATIONS_GB = 0.03  # CLIP-L over 77 tokens, per row
VAE_ENCODE_GB = 0.3  # transient activations of encoding one 512 px image (no gradients)
# CUDA context (lazy kernel loading), cuBLAS/cuDNN workspaces and the allocator's slack.
CUDA_OVERHEAD_GB = 0.6
# Optimizer state bytes per fp32 weight. bitsandbytes AdamW8bit: two 1-byte states (plus
# per-block scales, ~1%); Lion one state; Prodigy four (two moments, its s and the initial
# weights); Adafactor factored second moments only, a row and a column per matrix (~0).
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "lion": 4, "lion8bit": 1, "prodigy": 16,
                   "adafactor": 0}
# Adapter parameters per unit of rank on SD 1.5 (the sum of in + out features over the adapted
# layers; counted with models.lora.adapter_plan on SD 1.5's shapes). LoRA: the attention
# projections of the 16 transformer blocks and of CLIP-L's 12 layers. LoCon (and LoHa, LoKr):
# every linear and 1x1 convolution of the transformer blocks and ResNets, CLIP's MLPs, and the
# 3x3 convolutions at the conv rank. LoHa has two pairs per layer; LoKr's Kronecker factors
# are smaller than LoCon's (LoCon's figure bounds them). DoRA adds one magnitude per output.
LORA_UNET_PER_RANK = 199_296
LORA_TEXT_PER_RANK = 73_728
LOCON_UNET_PER_RANK = 506_816
LOCON_CONV_PER_RANK = 544_000
LOCON_TEXT_PER_RANK = 165_888
DORA_MAGNITUDES = {"LoRA": (99_840, 36_864), "LoCon": (315_520, 82_944)}  # (UNet, CLIP)

# SDXL at 1024 px (see the module docstring): activations per row, and the per-rank adapter
# figures counted the same way on SDXL base's shapes. LoRA: the attention projections of the
# UNet's 70 transformer blocks (560 layers); text: CLIP-L's 12 and bigG's 32 layers together.
SDXL_RESOLUTION = 1024
SDXL_ACTIVATIONS_GB = 8.95
SDXL_ACTIVATIONS_CHECKPOINTED_GB = 0.75
SDXL_TEXT_ENCODER_ACTIVATIONS_GB = 0.16  # CLIP-L + bigG (32 layers x 1280: 4.4x CLIP-L)
SDXL_LORA_UNET_PER_RANK = 1_451_520
SDXL_LORA_TEXT_PER_RANK = 73_728 + 327_680
SDXL_LOCON_UNET_PER_RANK = 2_718_400
SDXL_LOCON_CONV_PER_RANK = 355_840
SDXL_LOCON_TEXT_PER_RANK = 165_888 + 737_280
SDXL_DORA_MAGNITUDES = {"LoRA": (665_600, 36_864 + 163_840),
                        "LoCon": (1_488_960, 82_944 + 368_640)}


@dataclass(frozen=True)
class _Figures:
    """A family's calibration: the model it was taken on, at what resolution, and its
    per-row activations and per-rank adapter counts."""

    reference: ModelSizes
    resolution: int
    activations_gb: float
    activations_checkpointed_gb: float
    text_activations_gb: float
    lora_unet: int
    lora_text: int
    locon_unet: int
    locon_conv: int
    locon_text: int
    dora: dict


_FIGURES = {
    SD: _Figures(SD15, 512, ACTIVATIONS_GB, ACTIVATIONS_CHECKPOINTED_GB,
                 TEXT_ENCODER_ACTIVATIONS_GB, LORA_UNET_PER_RANK, LORA_TEXT_PER_RANK,
                 LOCON_UNET_PER_RANK, LOCON_CONV_PER_RANK, LOCON_TEXT_PER_RANK, DORA_MAGNITUDES),
    SDXL: _Figures(SDXL_BASE, SDXL_RESOLUTION, SDXL_ACTIVATIONS_GB,
                   SDXL_ACTIVATIONS_CHECKPOINTED_GB, SDXL_TEXT_ENCODER_ACTIVATIONS_GB,
                   SDXL_LORA_UNET_PER_RANK, SDXL_LORA_TEXT_PER_RANK, SDXL_LOCON_UNET_PER_RANK,
                   SDXL_LOCON_CONV_PER_RANK, SDXL_LOCON_TEXT_PER_RANK, SDXL_DORA_MAGNITUDES),
}


def _figures(sizes: ModelSizes) -> tuple[_Figures, float, float]:
    """The family's figures, and the width of ``sizes``' UNet and text encoder(s) relative to
    the model they were taken on (adapters and activations scale with the width)."""
    figures = _FIGURES.get(sizes.family, _FIGURES[SD])
    reference = figures.reference
    return (figures, (sizes.unet / reference.unet) ** 0.5,
            (sizes.text_encoders / reference.text_encoders) ** 0.5)


def adapter_parameters(config: "DreamBoothConfig", sizes: "ModelSizes") -> int:
    """How many weights a LoRA run trains (and its checkpoints store), for its Lora Type."""
    figures, width, text_width = _figures(sizes)  # adapter sizes scale with the width
    trains_text = config.train_text_encoder is not False
    plain = config.lora_type == "LoRA"
    unet = config.lora_unet_rank * (figures.lora_unet if plain else figures.locon_unet)
    if uses_conv(config):
        unet += config.lora_conv_rank * figures.locon_conv
    text = config.lora_txt_rank * (figures.lora_text if plain else figures.locon_text)
    pairs = 2 if config.lora_type == "LoHa" else 1
    count = pairs * (unet * width + (text * text_width if trains_text else 0))
    if uses_dora(config):
        unet_dora, text_dora = figures.dora[config.lora_type]
        count += unet_dora * width + (text_dora * text_width if trains_text else 0)
    return round(count)


@dataclass
class MemoryEstimate:
    """Peak GPU memory of a configuration, item by item, in GB (GiB)."""

    items: list[tuple[str, float]]
    device_gb: float  # the GPU's memory; 0 on the CPU
    on_gpu: bool
    notes: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)  # changes that would lower the peak

    @property
    def total_gb(self) -> float:
        """The estimated peak."""
        return sum(gb for _, gb in self.items)

    @property
    def fits(self) -> bool:
        """True on the CPU, or when the peak is within the GPU's memory."""
        return not self.on_gpu or self.total_gb <= self.device_gb

    def __str__(self) -> str:
        where = (f"of {self.device_gb:.1f} GB usable on the GPU" if self.on_gpu
                 else "(host memory: training runs on the CPU)")
        lines = [f"Estimated peak memory: {self.total_gb:.1f} GB {where}"]
        lines += [f"  {label:52} {gb:6.2f} GB" for label, gb in self.items if gb >= 0.005]
        lines += [f"  note: {n}" for n in self.notes]
        if not self.fits:
            lines.append("  It will not fit. Estimated peak after each change: "
                         + "; ".join(self.advice))
        return "\n".join(lines)


@dataclass(frozen=True)
class Fix:
    """One change that lowers the peak, with the estimate once it is made."""

    changes: dict  # field -> new value
    label: str  # what to do, in the form's words
    estimate_gb: float

    @property
    def fields(self) -> tuple[str, ...]:
        """The fields to change."""
        return tuple(self.changes)

    def __str__(self) -> str:
        return f"{self.label}: {self.estimate_gb:.1f} GB"


def estimate_peak_memory(config: "DreamBoothConfig", device: DeviceInfo, *,
                         sizes: ModelSizes | None = None, bitsandbytes: bool | None = None,
                         processes: int | None = None, fixes: bool = True) -> MemoryEstimate:
    """Estimate the peak memory of training ``config`` on ``device``.

    Blank (auto) preset fields are first filled as training would fill them. ``sizes`` are the
    model's parameter counts (from :func:`model_sizes` of the base model when None);
    ``bitsandbytes`` says whether 8-bit Adam can really run (detected when None);
    ``processes`` is the number of training processes (the WORLD_SIZE when None): with more
    than one, DistributedDataParallel keeps a bucket copy of the gradients. The estimate is
    compared with the GPU's usable (free) memory; with ``fixes`` its ``advice`` lists the
    changes that lower it, each with the estimate once made (see :func:`memory_fixes`).
    """

    sizes = sizes or model_sizes(config.base_model)
    original, config = config, apply_preset(config, device, family=sizes.family)[0]
    on_gpu = device.kind == "cuda" and not config.use_cpu
    if bitsandbytes is None:
        bitsandbytes = importable("bitsandbytes")
    if processes is None:
        processes = int(os.environ.get("WORLD_SIZE", "1") or 1)
    precision = config.mixed_precision if on_gpu else "no"
    half = 2 if precision in ("fp16", "bf16") else 4
    notes: list[str] = []
    items = _trained_items(config, sizes, half, on_gpu, bitsandbytes, processes, notes)
    items += _step_items(config, device, sizes, half, on_gpu, precision)
    if sizes.label not in (SD15.label, SD2.label, SDXL_BASE.label):
        notes.append(f"model sizes counted from {sizes.label}")

    estimate = MemoryEstimate(items, device.usable_memory_gb if on_gpu else 0.0, on_gpu, notes)
    if fixes and on_gpu:
        found = memory_fixes(original, device, sizes=sizes, bitsandbytes=bitsandbytes,
                             processes=processes)
        estimate.advice = [str(f) for f in found if f.estimate_gb < estimate.total_gb - 0.05]
    return estimate


def _optimizer_state(config: "DreamBoothConfig", on_gpu: bool, half: int, bitsandbytes: bool,
                     notes: list[str]) -> tuple[int, int, str]:
    """``(weight bytes, optimizer state bytes, label)`` per trained weight of a full
    fine-tune; notes when 8-bit Adam is asked for but cannot run."""
    name = config.optimizer if config.optimizer in ("Lion", "Prodigy", "Adafactor") else "AdamW"
    eight_bit = bool(config.use_8bit_adam) and on_gpu and name in ("AdamW", "Lion")
    if eight_bit and not bitsandbytes:
        notes.append("8-bit Adam is on but bitsandbytes is not installed: counted as torch "
                     f"{name} ({INSTALL_HINT})")
        eight_bit = False
    # Half model: the trained weights, their gradients and torch optimizers' states in 16 bit.
    full_half = bool(config.full_fp16) and half == 2 and not config.use_lora
    weight_bytes = 2 if full_half else 4
    optimizer_bytes = OPTIMIZER_BYTES[name.lower() + ("8bit" if eight_bit else "")]
    if full_half and not eight_bit and name != "Adafactor":
        optimizer_bytes //= 2
    label = (f"8-bit {name}" if eight_bit else
             f"{name}, {'16-bit' if full_half and name != 'Adafactor' else 'fp32'}")
    return weight_bytes, optimizer_bytes, label


def _trained_items(config: "DreamBoothConfig", sizes: ModelSizes, half: int, on_gpu: bool,
                   bitsandbytes: bool, processes: int, notes: list[str]
                   ) -> list[tuple[str, float]]:
    """The weights, and the gradients and optimizer states of what trains (GiB)."""
    trains_text = bool(config.train_text_encoder)
    weight_bytes, optimizer_bytes, optimizer_label = _optimizer_state(
        config, on_gpu, half, bitsandbytes, notes)
    text_label = ("text encoders 1+2 weights ("
                  if sizes.text_encoder_2 else "text encoder weights (")
    # Frozen encoders whose prompts are all encoded before the run leave the GPU.
    frozen_text = 0.0 if prompts_known(config) else sizes.text_encoders * half / GIB
    frozen_label = (f"{text_label}{_dtype(half)}, frozen)" if frozen_text else
                    f"{text_label}frozen): prompts encoded once, off the GPU)")
    if config.use_lora:
        adapters = adapter_parameters(config, sizes)
        return [
            (f"UNet weights ({_dtype(half)}, frozen)", sizes.unet * half / GIB),
            (frozen_label, frozen_text),
            (f"{config.lora_type} adapters: fp32 weights, gradients, AdamW states",
             adapters * (4 + 4 + 8) / GIB)]
    trained = sizes.unet + (sizes.text_encoders if trains_text else 0)
    trained_dtype = _dtype(weight_bytes)
    items = [(f"UNet weights ({trained_dtype}, trained)", sizes.unet * weight_bytes / GIB),
             (f"{text_label}{trained_dtype}, trained)", sizes.text_encoders * weight_bytes / GIB)
             if trains_text else (frozen_label, frozen_text),
             (f"gradients ({trained_dtype})", trained * weight_bytes / GIB),
             (f"optimizer states ({optimizer_label})", trained * optimizer_bytes / GIB)]
    if processes > 1:
        items.append(("gradient buckets of DistributedDataParallel",
                      trained * weight_bytes / GIB))
    return items


def _step_items(config: "DreamBoothConfig", device: DeviceInfo, sizes: ModelSizes, half: int,
                on_gpu: bool, precision: str = "fp16") -> list[tuple[str, float]]:
    """What a training step adds on top of the weights: activations, the VAE when latents are
    not cached, the EMA copy and the CUDA context (GiB)."""
    # Activations scale with the width and the image area (from the family's own figures).
    figures, width, text_width = _figures(sizes)
    area = (config.resolution / figures.resolution) ** 2
    prior = any(c.wants_prior_preservation for c in config.concepts_list)
    rows = config.train_batch_size * (2 if prior else 1)
    checkpointing = bool(config.gradient_checkpointing)
    per_row = (figures.activations_checkpointed_gb if checkpointing
               else figures.activations_gb)
    per_row *= ATTENTION_FACTOR.get(_attention(config.attention, device), 1.0)
    if half == 4:
        per_row *= FP32_ACTIVATION_FACTOR
    items = [(f"activations ({rows} row(s) at {config.resolution} px"
              f"{', checkpointed' if checkpointing else ''})", rows * per_row * area * width)]
    if config.train_text_encoder:
        text_rows = figures.text_activations_gb * (0.2 if checkpointing else 1.0) * (4 / half)
        items.append(("text encoder activations", rows * text_rows * text_width))
    if sizes.text_encoder_2:  # SDXL's conditioning: both encoders' states side by side, the
        # pooled embedding and the six size/crop numbers, per row
        items.append(("text embeddings (77 x 2048, pooled 1280, size/crop ids)",
                      rows * (77 * 2048 + 1280 + 6) * half / GIB))
    if not config.cache_latents:
        # SDXL's VAE encodes in fp32 under fp16 (training.placement.vae_compute_dtype); bf16
        # has fp32's range.
        upcast = precision == "fp16" and vae_upcasts(config.pretrained_vae_name_or_path, sizes)
        vae_bytes = 4 if upcast else half
        vae_area = (config.resolution / 512) ** 2  # the VAE is the same in both families
        items.append((f"VAE ({_dtype(vae_bytes)}{': it overflows in fp16' if upcast else ''}) "
                      "and encoding each step",
                      sizes.vae * vae_bytes / GIB
                      + rows * VAE_ENCODE_GB * vae_area * (vae_bytes / 2)))
    if config.use_ema and not config.ema_on_cpu:
        items.append(("EMA copy of the UNet (fp32)", sizes.unet * 4 / GIB))
    if on_gpu:
        items.append(("CUDA context, workspaces, allocator slack", CUDA_OVERHEAD_GB))
    return items


def warn_if_too_big(config: "DreamBoothConfig", device: DeviceInfo, *,
                    sizes: ModelSizes | None = None,
                    bitsandbytes: bool | None = None) -> MemoryEstimate | None:
    """Log a warning (with what to change) when ``config`` will not fit ``device``'s memory.
    Says nothing on the CPU; returns the estimate (None on the CPU). The keywords are those of
    :func:`estimate_peak_memory`."""
    if device.kind != "cuda" or config.use_cpu:
        return None
    try:
        estimate = estimate_peak_memory(config, device, sizes=sizes, bitsandbytes=bitsandbytes)
    except Exception as exc:  # an estimate must never stop a run
        log.debug("no memory estimate: %s", exc)
        return None
    if not estimate.fits:
        log.warning("This configuration needs about %.1f GB of GPU memory but %s has %.1f GB "
                    "usable: it will probably run out of memory. Estimated peak after each "
                    "change: %s", estimate.total_gb, device.name, device.usable_memory_gb,
                    "; ".join(estimate.advice))
    else:
        log.info("Estimated peak GPU memory %.1f GB of %.1f GB", estimate.total_gb,
                 device.usable_memory_gb)
    return estimate


def memory_fixes(config: "DreamBoothConfig", device: DeviceInfo, *,
                 sizes: ModelSizes | None = None, bitsandbytes: bool | None = None,
                 processes: int | None = None) -> list[Fix]:
    """Each single change that would lower ``config``'s peak on ``device``, in the order a user
    would try them (cheapest in quality first), with the estimate once it is made. Blank
    fields are filled by the preset first; Use LORA is estimated with the preset's LoRA
    values."""

    if bitsandbytes is None:
        bitsandbytes = importable("bitsandbytes")
    family = (sizes or model_sizes(config.base_model)).family
    resolved = apply_preset(config, device, family=family)[0]

    def estimate(changed: "DreamBoothConfig", bnb: bool = bitsandbytes) -> float:
        return estimate_peak_memory(changed, device, sizes=sizes, bitsandbytes=bnb,
                                    processes=processes, fixes=False).total_gb

    fixes: list[Fix] = []

    def add(changes: dict, label: str, bnb: bool = bitsandbytes) -> None:
        fixes.append(Fix(changes, label, estimate(resolved.copy(**changes), bnb)))

    full = not resolved.use_lora
    if not resolved.gradient_checkpointing:
        add({"gradient_checkpointing": True}, "turn on Gradient checkpointing")
    eight_bit = bool(resolved.use_8bit_adam) and bitsandbytes
    if full and resolved.optimizer in ("AdamW", "Lion") and not eight_bit:
        if bitsandbytes:
            add({"use_8bit_adam": True}, "turn on Use 8bit Adam")
        else:
            add({"use_8bit_adam": True}, f"install bitsandbytes ({INSTALL_HINT}, CUDA only) "
                "and turn on Use 8bit Adam", bnb=True)
    if full and resolved.optimizer != "Adafactor":
        add({"optimizer": "Adafactor"}, "set Optimizer to Adafactor (the least optimizer "
            "memory; it may need another learning rate)")
    if resolved.use_ema and not resolved.ema_on_cpu:
        add({"ema_on_cpu": True}, "turn on Keep EMA on CPU")
    if not resolved.cache_latents:
        add({"cache_latents": True}, "turn on Cache latents")
    if resolved.train_batch_size and resolved.train_batch_size > 1:
        add({"train_batch_size": 1}, "set Batch size to 1 (raise Gradient accumulation steps "
            "instead)")
    if full and resolved.train_text_encoder:
        add({"train_text_encoder": False}, "turn off Train Text Encoder")
    if full:
        fixes.append(Fix({"use_lora": True}, "turn on Use LORA",
                         estimate(config.copy(use_lora=True))))
    smaller = smaller_resolution(resolved.resolution, family)
    if smaller:
        add({"resolution": smaller}, f"set Resolution to {smaller}"
            + (" (SDXL was trained at 1024 px: smaller images lose detail)"
               if family == SDXL else ""))
    return fixes


def smaller_resolution(resolution: int, family: str = SD) -> int | None:
    """The resolution a memory fix offers below ``resolution``: 512 for SD; for SDXL 768, then
    512 (SDXL was trained at 1024: quality drops below it). None when already there."""
    for smaller in ((768, 512) if family == SDXL else (512,)):
        if resolution > smaller:
            return smaller
    return None


def _dtype(half: int) -> str:
    return "fp16/bf16" if half == 2 else "fp32"


def _attention(choice: str | None, device: DeviceInfo) -> str:
    return "flash_attention" if choice == "flash_attention" and device.flash_attention else "sdpa"


@lru_cache(maxsize=16)
def model_sizes(base_model: str) -> ModelSizes:
    """Parameter counts of ``base_model``: counted from its configs when they are on this
    machine (the tiny models, a local diffusers folder, a Hub model already downloaded), else
    those of SDXL base for an SDXL model (:func:`~colab_dreambooth.models.families.
    detect_family`), of SD 2.x for a name that says so and of SD 1.x otherwise. Loads no
    weights."""

    name = base_model.strip()
    try:
        if name == TINY_MODEL:
            return count_parameters(tiny_model_path(), "the tiny model")
        if name == TINY_SDXL_MODEL:
            return count_parameters(tiny_sdxl_model_path(), "the tiny SDXL model")
        folder = _local_folder(name)
        if folder is not None:
            return count_parameters(folder, name)
    except Exception as exc:  # unreadable configs: fall back to the published sizes
        log.debug("could not count the parameters of %s: %s", name, exc)
    if detect_family(name) == SDXL:
        return SDXL_BASE
    lowered = name.lower()
    return SD2 if ("stable-diffusion-2" in lowered or "sd2" in lowered
                   or "v2-1" in lowered) else SD15


def vae_upcasts(vae: str, sizes: ModelSizes) -> bool:
    """True when training encodes in fp32 under fp16 (training.placement.vae_compute_dtype):
    an SDXL model's own VAE does (``sizes.vae_fp32``), another VAE (the VAE field) as its
    config's ``force_upcast`` says: a folder's or a Hub id's in the Hub cache; a single file
    has the base model's config; an id not downloaded yet counts as fp32 unless its name says
    fp16 (madebyollin/sdxl-vae-fp16-fix)."""
    name = vae.strip()
    if sizes.family != SDXL or not name:
        return sizes.vae_fp32
    return _vae_config_upcasts(name, sizes.vae_fp32)


def _vae_config_upcasts(name: str, base: bool) -> bool:
    path = Path(name).expanduser()
    candidates = [path / "vae" / "config.json", path / "config.json"] if path.is_dir() else []
    if not path.exists() and name.count("/") == 1:  # a Hub id: only its local cache
        from huggingface_hub import try_to_load_from_cache

        for file in ("config.json", "vae/config.json"):
            found = try_to_load_from_cache(name, file)
            if isinstance(found, str):
                candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file():
            try:
                return bool(_read(candidate).get("force_upcast", True))
            except (OSError, ValueError):
                break
    if path.is_file():
        return base
    return "fp16" not in name.lower()


def _local_folder(name: str) -> Path | None:
    path = Path(name).expanduser()
    if (path / "unet" / "config.json").is_file():
        return path
    if path.suffix.lower() in (".safetensors", ".ckpt"):
        converted = path.with_name(path.stem + "-diffusers")
        return converted if (converted / "unet" / "config.json").is_file() else None
    if name.count("/") == 1 and not path.exists():  # a Hub id: only its local cache
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "unet/config.json")
        if isinstance(found, str):
            return Path(found).parent.parent
    return None


def count_parameters(folder: str | os.PathLike, label: str) -> ModelSizes:
    """Parameter counts of a diffusers folder's UNet, text encoder(s) and VAE, from their
    configs alone (built on the meta device: no memory, no weights read), and its family
    (an SDXL VAE counts as fp32 unless its config turns ``force_upcast`` off, as fixed fp16
    VAEs do)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    family = folder_family(folder)
    vae_config = _read(folder / "vae" / "config.json")
    second = folder / "text_encoder_2"
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(_read(folder / "unet" / "config.json"))
        vae = AutoencoderKL.from_config(vae_config)
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        text_2 = (CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(second))
                  if (second / "config.json").is_file() else None)
    return ModelSizes(_numel(unet), _numel(text), _numel(vae), label,
                      _numel(text_2) if text_2 is not None else 0, family,
                      family == SDXL and bool(vae_config.get("force_upcast", True)))


def _read(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["Fix", "MemoryEstimate", "ModelSizes", "SD15", "SD2", "SDXL_BASE", "count_parameters",
           "estimate_peak_memory", "memory_fixes", "model_sizes", "smaller_resolution",
           "vae_upcasts", "warn_if_too_big"]
