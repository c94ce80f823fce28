"""The settings of the commands that work on a model: ``sample``, ``export``, ``dehydrate``,
``create-model`` and ``extract-lora``.

They are declared as the run's fields are (:func:`colab_dreambooth.config.fields.setting`): the
command line builds its options from them (``cli.options.add_settings_options``) and the
notebook forms take the same declarations (notebook 04's release form declares its export and
dehydrate fields with :func:`~colab_dreambooth.config.fields.same_setting`; a concept's preview
samples default to :class:`SampleSettings`), so their defaults cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from colab_dreambooth.config.fields import setting


@dataclass
class SampleSettings:
    """How ``sample`` draws images from a model (a concept's previews start from these)."""

    lora: Optional[str] = setting(
        None, "LoRA file", "A LoRA .safetensors (ours, kohya's, the WebUI's) applied on the "
        "model.", "Sampling", path=True)
    lora_scale: float = setting(
        1.0, "LoRA scale", "The LoRA's strength, the WebUI's <lora:name:scale>.", "Sampling")
    n: int = setting(1, "Images per prompt", "Images to generate per prompt.", "Sampling",
                     minimum=1)
    seed: int = setting(
        -1, "Seed", "Seed of the first image of each prompt (the next ones count up from it); "
        "-1 = random.", "Sampling", minimum=-1)
    negative_prompt: str = setting("", "Negative prompt", "What the images should not show.",
                                   "Sampling")
    steps: int = setting(20, "Steps", "Inference steps per image.", "Sampling", minimum=1,
                         maximum=500)
    guidance_scale: float = setting(7.5, "CFG scale", "Classifier-free guidance.", "Sampling",
                                    minimum=0.0, maximum=50.0)
    height: Optional[int] = setting(
        None, "Height", "Image height in pixels (a multiple of 8). Blank = the model's.",
        "Sampling", minimum=64)
    width: Optional[int] = setting(
        None, "Width", "Image width in pixels (a multiple of 8). Blank = the model's.",
        "Sampling", minimum=64)
    columns: Optional[int] = setting(None, "Grid columns", "Columns of the grid. Blank = up "
                                     "to 4.", "Sampling", minimum=1)


@dataclass
class ExportSettings:
    """How ``export`` (and notebook 04's release) writes the single-file checkpoint."""

    # On by default: what WebUI users expect (a 2 GB file; the WebUI loads fp16 anyway).
    fp16: bool = setting(
        True, "Half precision (fp16)", "Export in fp16: half the file (about 2 GB for SD 1.5), "
        "what the WebUI loads anyway. Off = fp32, twice the size.", "Saving")
    ema: bool = setting(
        False, "Export the EMA UNet", "Use the EMA weights (only when trained with Train EMA).",
        "Saving")


@dataclass
class DehydrateSettings:
    """How ``dehydrate`` (and notebook 04's release) stores a model as its change."""

    rank: Optional[int] = setting(
        None, "Dehydrate rank", "Blank = lossless (bit-exact). A rank (e.g. 128) stores the "
        "changes as low-rank factors: smaller, slightly lossy.", "Saving", minimum=1)


@dataclass
class CreateModelSettings:
    """How ``create-model`` converts a single-file checkpoint into a diffusers folder."""

    # Off: a base to train from keeps its full precision; fp16 only saves disk.
    fp16: bool = setting(
        False, "Half precision (fp16)", "Write half-precision weights: half the disk. Off = "
        "fp32.", "Model")
    ema: bool = setting(
        False, "EMA weights", "Take the UNet's EMA weights when the file has them.", "Model")


@dataclass
class ExtractLoraSettings:
    """How ``extract-lora`` (and notebook 04's release) makes a LoRA from a full fine-tune, as
    kohya's ``extract_lora_from_models.py`` does (its option names in the help)."""

    rank: int = setting(
        32, "Extracted LoRA rank", "Rank (kohya's --dim) of the extracted LoRA's linear and 1x1 "
        "layers; alpha = rank. Higher keeps more of the fine-tune in a bigger file (about 1.2 "
        "MB per rank on SD 1.5 in fp16).", "Saving", minimum=1, maximum=1024)
    conv_rank: int = setting(
        0, "Extracted conv rank", "Rank (kohya's --conv_dim) of the 3x3 convolutions of the "
        "ResNet, down- and up-sampling blocks (a LoCon); 0 = left out.", "Saving", minimum=0,
        maximum=1024)
    clamp_quantile: float = setting(
        0.99, "Clamp quantile", "Clamp the factors to this quantile of their values, as kohya "
        "does (1 = no clamping).", "Saving", minimum=0.0, maximum=1.0)
    min_diff: float = setting(
        0.01, "Text encoder min diff", "Leave the text encoder out unless one of its weights "
        "changed by more than this (kohya's --min_diff; a short DreamBooth run changes it by "
        "less: lower it to keep it).", "Saving", minimum=0.0)
    save_precision: str = setting(
        "fp16", "Extracted LoRA precision", "dtype of the saved factors.", "Saving",
        choices=("fp16", "bf16", "fp32", "float"))

