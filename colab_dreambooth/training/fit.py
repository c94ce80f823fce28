"""Fit a run to the GPU before any model is loaded.

The GPU's preset fills the blank (auto) fields knowing which optional packages import here
(8-bit Adam only with bitsandbytes). When the estimate of
:mod:`colab_dreambooth.training.memory` then
exceeds the GPU's usable memory, the blank fields are lowered step by step (checkpointing,
batch size, cached latents, the text encoder frozen), each step saying why, until it fits with
a margin. When what is left over budget comes from fields the user set (or the defaults of
fields no preset decides, such as the optimizer or LoRA), the run is refused with the fields
to change and the estimate after each change, unless ``force`` is given.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from colab_dreambooth.config.concept import Concept
from colab_dreambooth.config.presets import (
    PRESET_FIELDS,
    PRESETS,
    Choice,
    Preset,
    apply_preset,
    format_choices,
    preset_for,
)
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.errors import ConfigError, Problem
from colab_dreambooth.models.families import detect_family
from colab_dreambooth.runtime.device import DeviceInfo, detect_device
from colab_dreambooth.runtime.environment import Runtime, detect_runtime, package_versions
from colab_dreambooth.runtime.packages import INSTALL_HINT, importable
from colab_dreambooth.training.memory import (
    SDXL_BASE,
    Fix,
    MemoryEstimate,
    ModelSizes,
    estimate_peak_memory,
    memory_fixes,
    model_sizes,
)

log = logging.getLogger(__name__)

# Blank fields are lowered until the estimate is at most this share of the usable memory: the
# estimate is within ~10% of published measurements, and fragmentation needs some room.
AUTO_MARGIN = 0.9


class GpuMemoryError(ConfigError):
    """The fields the user set need more GPU memory than the GPU has (``plan`` says how much
    and what each fix would give); ``force`` tries anyway."""

    def __init__(self, plan: "MemoryPlan"):
        self.plan = plan
        problems = [Problem(", ".join(f.fields), f"{f.label}: about {f.estimate_gb:.1f} GB"
                            + (" (fits)" if f.estimate_gb <= plan.budget_gb else ""))
                    for f in plan.fixes]
        super().__init__(problems)
        lines = "\n".join(f"  - {p}" for p in problems)
        self.args = (
            f"This run needs about {plan.estimate.total_gb:.1f} GB of GPU memory by the "
            f"package's estimate, but {plan.device.name} has {plan.budget_gb:.1f} GB usable: "
            f"it would run out of memory. Change one of these fields (estimated peak after the "
            f"change):\n{lines}\nOr start it anyway with force (train --force; "
            "train(config, force=True)).",)


@dataclass
class MemoryPlan:
    """What a run on ``device`` will use: the config with blank fields filled, why each value,
    the estimate, what the fitting lowered, and (when it does not fit) the fixes."""

    config: "DreamBoothConfig"
    device: DeviceInfo
    preset: Preset
    choices: list[Choice]
    estimate: MemoryEstimate
    packages: dict[str, bool]
    lowered: list[str] = field(default_factory=list)  # what fitting changed, with figures
    fixes: list[Fix] = field(default_factory=list)  # when over budget or tight

    @property
    def budget_gb(self) -> float:
        """The GPU's usable memory (free when measured)."""
        return self.device.usable_memory_gb

    @property
    def fits(self) -> bool:
        """True on the CPU, or when the estimate is within the usable memory."""
        return self.estimate.fits

    def __str__(self) -> str:
        packages = ", ".join(f"{name} {'imports' if ok else 'missing'}"
                             for name, ok in self.packages.items())
        lines = [format_choices(self.choices, self.preset), f"  optional packages: {packages}"]
        lines += [f"  lowered to fit: {text}" for text in self.lowered]
        lines += ["", str(self.estimate)]
        if self.fits and self.estimate.on_gpu and (
                self.estimate.total_gb > AUTO_MARGIN * self.budget_gb):
            lines.append(f"  Tight: within {100 - AUTO_MARGIN * 100:.0f}% of the usable memory "
                         "(the estimate is good to about 10%); if it runs out of memory: "
                         + "; ".join(str(f) for f in self.fixes))
        if not self.fits:
            lines.append("  Refused before any model is loaded unless forced (train --force).")
        return "\n".join(lines)


def plan_memory(config: "DreamBoothConfig", device: DeviceInfo, *,
                packages: dict[str, bool] | None = None, sizes: ModelSizes | None = None,
                processes: int | None = None) -> MemoryPlan:
    """Fill ``config``'s blank fields for ``device`` and lower them until the estimate fits.

    ``packages`` says which optional packages import (detected when None); ``sizes`` and
    ``processes`` are those of :func:`~colab_dreambooth.training.memory.estimate_peak_memory`.
    """
    if packages is None:
        packages = {"bitsandbytes": importable("bitsandbytes"),
                    "xformers": importable("xformers")}
    bnb = packages.get("bitsandbytes", False)
    device = DeviceInfo.cpu() if config.use_cpu else device
    preset = preset_for(config, device)
    family = (sizes or model_sizes(config.base_model)).family
    resolved, choices = apply_preset(config, device, preset, family=family)
    by_field = {c.field: c for c in choices}
    on_gpu = device.kind == "cuda"
    if on_gpu and config.use_8bit_adam is None and resolved.use_8bit_adam and not bnb:
        resolved = resolved.copy(use_8bit_adam=False)
        by_field["use_8bit_adam"] = Choice("use_8bit_adam", False, "bitsandbytes does not "
                                           f"import here ({INSTALL_HINT}): 32-bit optimizer "
                                           "states", True)

    def estimate(c: "DreamBoothConfig") -> MemoryEstimate:
        return estimate_peak_memory(c, device, sizes=sizes, bitsandbytes=bnb,
                                    processes=processes, fixes=False)

    current = estimate(resolved)
    lowered: list[str] = []
    target = AUTO_MARGIN * device.usable_memory_gb
    for name, value, why in _lowering_steps(config, resolved):
        if not on_gpu or current.total_gb <= target:
            break
        trial = resolved.copy(**{name: value})
        after = estimate(trial)
        if after.total_gb >= current.total_gb - 0.01:
            continue
        reason = (f"lowered to fit: {why}; the estimate goes from {current.total_gb:.1f} to "
                  f"{after.total_gb:.1f} GB of {device.usable_memory_gb:.1f} GB usable")
        lowered.append(f"{name} = {_show(value)} ({current.total_gb:.1f} -> "
                       f"{after.total_gb:.1f} GB): {why}")
        by_field[name] = Choice(name, value, reason, True)
        resolved, current = trial, after
    choices = [by_field[c.field] for c in choices]
    final = estimate_peak_memory(resolved, device, sizes=sizes, bitsandbytes=bnb,
                                 processes=processes)
    plan = MemoryPlan(resolved, device, preset, choices, final, dict(packages), lowered)
    if on_gpu and final.total_gb > target:  # over budget, or tight
        fixes = memory_fixes(resolved, device, sizes=sizes, bitsandbytes=bnb,
                             processes=processes)
        if not config.use_lora:  # LoRA as the plan would make it: its own preset values
            lora = plan_memory(config.copy(use_lora=True), device, packages=packages,
                               sizes=sizes, processes=processes)
            fixes = [Fix(f.changes, f.label, lora.estimate.total_gb) if "use_lora" in f.changes
                     else f for f in fixes]
        plan.fixes = [f for f in fixes if f.estimate_gb < final.total_gb - 0.05]
    return plan


def enforce(plan: MemoryPlan, *, force: bool = False) -> None:
    """Raise :class:`GpuMemoryError` when ``plan`` does not fit (a warning with ``force``);
    log the plan's estimate either way."""
    if plan.fits:
        if plan.device.kind == "cuda":
            log.info("Estimated peak GPU memory %.1f GB of %.1f GB usable on %s",
                     plan.estimate.total_gb, plan.budget_gb, plan.device.name)
        return
    error = GpuMemoryError(plan)
    if not force:
        raise error
    log.warning("Forced: %s", error)


def _lowering_steps(user: "DreamBoothConfig", resolved: "DreamBoothConfig"):
    """(field, value, why) for each blank field that can still be lowered, in order of what
    costs the least quality: the same training, slower; then less per step; then less
    training of CLIP."""
    if user.gradient_checkpointing is None and not resolved.gradient_checkpointing:
        yield ("gradient_checkpointing", True,
               "recomputing activations saves ~1 GB per image, ~25% slower")
    if user.cache_latents is None and not resolved.cache_latents:
        yield "cache_latents", True, "the VAE leaves the GPU"
    if user.train_batch_size is None:
        batch = resolved.train_batch_size or 1
        while batch > 1:
            batch //= 2
            yield ("train_batch_size", batch,
                   "fewer images per step (raise Gradient accumulation steps to keep the "
                   "effective batch)")
    if user.train_text_encoder is None and resolved.train_text_encoder and not resolved.use_lora:
        yield ("train_text_encoder", False,
               "the UNet alone trains (the text encoder's weights, gradients and optimizer "
               "states stay off); turn on Use LORA to train both in less memory")


def _show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def environment_report(config=None, device: DeviceInfo | None = None,
                       runtime: Runtime | None = None, *, planned: bool = False) -> str:
    """Text for ``colab-dreambooth env``: the service and its folders, Drive, the GPU(s), the
    package versions, the preset's choices for ``config`` (the defaults when None) fitted to
    the GPU, and the estimate of peak GPU memory with what to change when it will not fit.
    ``planned``: ``device`` is a GPU the user does not have yet (``env --gpu``)."""

    config = config if config is not None else DreamBoothConfig()
    device = device or (DeviceInfo.cpu() if config.use_cpu else detect_device())
    runtime = runtime or detect_runtime()
    lines = [f"Platform:     {runtime.name}",
             f"Work folder:  {runtime.work_dir}"]
    if runtime.platform == "colab":
        lines.append(f"Google Drive: {runtime.drive_dir or 'not mounted (mount_drive() mounts it)'}")
    if device.kind == "cuda":
        gpus = f" x{device.count}" if device.count > 1 else ""
        free = (f" ({device.free_memory_gb:.1f} GB free)"
                if device.free_memory_gb is not None else "")
        label = "GPU planned:  " if planned else "GPU:          "
        lines.append(f"{label}{device.name}{gpus}, {device.memory_gb:.1f} GB{free}, compute "
                     f"capability {device.capability[0]}.{device.capability[1]}, bf16 "
                     f"{'yes' if device.bf16 else 'no'}, flash attention "
                     f"{'yes' if device.flash_attention else 'no'}"
                     + (" (not this machine's: planning only)" if planned else ""))
    else:
        lines.append("GPU:          none (the CPU: fine for the tiny model, very slow for SD)")
    versions = package_versions()
    lines.append("Packages:     " + ", ".join(
        f"{name} {v or 'not installed'}" for name, v in versions.items()))
    lines.append(f"Model:        {config.base_model} ({detect_family(config.base_model)})")
    lines += ["", str(plan_memory(config, device))]
    return "\n".join(lines)


# What the SDXL table estimates: SDXL base at 1024 px, prior preservation (two rows per
# instance image), LoRA at rank 32 (issue 15's targets).
SDXL_TABLE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
_PRIOR = Concept(instance_prompt="photo of sks dog", class_prompt="photo of a dog",
                 instance_data_dir="instance", num_class_images=100)


def preset_device(preset: Preset) -> DeviceInfo:
    """The GPU a preset row was sized for, as if detected (bf16 and flash attention where the
    row uses them)."""
    bf16 = preset.values["mixed_precision"][0] == "bf16"
    return DeviceInfo("cuda", preset.label, preset.memory_gb, bf16, 1,
                      (8, 0) if bf16 else (7, 5))


def describe_sdxl_presets() -> str:
    """The SDXL rows of the preset table as Markdown (``colab-dreambooth env --presets``): per
    GPU class, full fine-tuning and LoRA, the values an SDXL model gets and the estimated peak
    at 1024 px with prior preservation (LoRA rank 32), or what to do when it does not fit."""
    head = ("| preset | GPU | SDXL | " + " | ".join(PRESET_FIELDS)
            + " | peak GB (1024 px, prior) |")
    lines = [head, "|" + "---|" * (len(PRESET_FIELDS) + 4)]
    for preset in PRESETS:
        if preset.name == "CPU":
            continue
        device = preset_device(preset)
        for lora in (False, True):
            config = DreamBoothConfig(pretrained_model_name_or_path=SDXL_TABLE_MODEL,
                                      concepts_list=[_PRIOR], resolution=1024, use_lora=lora,
                                      lora_unet_rank=32, lora_txt_rank=32)
            resolved = apply_preset(config, device, preset, family=SDXL_BASE.family)[0]
            estimate = estimate_peak_memory(resolved, device, sizes=SDXL_BASE,
                                            bitsandbytes=True, fixes=False)
            peak = f"{estimate.total_gb:.1f}"
            if estimate.total_gb > AUTO_MARGIN * preset.memory_gb:
                peak += (f" (does not fit {preset.memory_gb:.0f} GB"
                         + (": turn on Use LORA)" if not lora else ")"))
            cells = [_show(getattr(resolved, name)) for name in PRESET_FIELDS]
            lines.append(f"| {preset.name} | {preset.label} | {'LoRA' if lora else 'full'} | "
                         + " | ".join(cells) + f" | {peak} |")
    return "\n".join(lines)


__all__ = ["AUTO_MARGIN", "GpuMemoryError", "MemoryPlan", "describe_sdxl_presets", "enforce",
           "plan_memory", "preset_device"]
