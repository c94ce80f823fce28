"""After training: sample the model, export it, describe it, and send it where it should go.

:class:`ReleaseSettings` holds the choices of notebook 04 (export format, model card, dehydrate,
destination); :func:`make_release` carries them out on a trained model:

1. export one ``.safetensors`` for the WebUI/ComfyUI
(:mod:`colab_dreambooth.models.single_file.export`);
2. write the Hub model card ``README.md`` with the sample grid (:mod:`~.model_card`);
3. optionally dehydrate: the model as its difference from the base (:mod:`~.dehydrate`);
4. optionally send it all to a folder (e.g. on Google Drive) or a Hub repo
   (:func:`colab_dreambooth.runtime.storage.publish`): the files above and, unless turned off, the
   diffusers folder, laid out so ``from_pretrained`` loads the repo as the card says.

Everything is written into ``<model dir>/release/`` first (files there are this module's own
and are replaced by the next release); the model folder itself is only read.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from colab_dreambooth.config.commands import DehydrateSettings, ExportSettings, ExtractLoraSettings
from colab_dreambooth.config.fields import same_setting, setting
from colab_dreambooth.config.settings import DreamBoothConfig, safe_name
from colab_dreambooth.errors import ConfigError, ModelLoadError, Problem
from colab_dreambooth.files import copy_file_atomic
from colab_dreambooth.generation.sample import SampleJob, run_samples, sample_concepts
from colab_dreambooth.models.lora import lora_file_path
from colab_dreambooth.models.lora_extract import extract_lora
from colab_dreambooth.models.pipelines import load_trained_pipeline
from colab_dreambooth.models.single_file.dehydrate import dehydrate, human_size
from colab_dreambooth.models.single_file.export import export_single_file
from colab_dreambooth.publish.model_card import write_model_card
from colab_dreambooth.runtime.storage import HubRepo, StorageError, parse_destination, publish

log = logging.getLogger(__name__)

RELEASE_FOLDER = "release"
# Left out of a Hub upload: it names folders of this machine (the model card says the rest).
PRIVATE_FILES = ("params.json",)


@dataclass
class ReleaseSettings:
    """What notebook 04 makes of a trained model, and where it sends it."""

    export_name: str = setting(
        "", "Export file name", "Name of the single .safetensors file for the WebUI/ComfyUI "
        "(without the suffix). Blank = the model name.", "Saving")
    # The export and dehydrate choices are the commands' own declarations: same defaults.
    fp16: bool = same_setting(ExportSettings, "fp16")
    ema: bool = same_setting(ExportSettings, "ema")
    model_card: bool = setting(
        True, "Write a model card", "A README.md for the Hub with the trigger words, settings "
        "and the sample grid; costs nothing.", "Saving")
    dehydrate: bool = setting(
        False, "Dehydrate", "Also write the model as its difference from the base model: far "
        "smaller to keep, rebuilt later with `colab-dreambooth rehydrate` and the same base. "
        "Costs a pass over every weight (minutes for SD).", "Saving")
    dehydrate_rank: Optional[int] = same_setting(DehydrateSettings, "rank")
    extract_lora: bool = setting(
        False, "Extract a LoRA", "Also write the fine-tune as a LoRA file (the SVD of its change "
        "from the base, as kohya's extract_lora_from_models.py): tens of MB instead of GBs, for "
        "the WebUI's <lora:name:1>. Full fine-tunes only.", "Saving")
    extract_rank: int = same_setting(ExtractLoraSettings, "rank")
    extract_conv_rank: int = same_setting(ExtractLoraSettings, "conv_rank")
    destination: str = setting(
        "", "Send to", "A folder (e.g. /content/drive/MyDrive/models) or hf://<user>/<repo> "
        "for a Hub repo (token from Colab's HF_TOKEN secret). Blank = keep it here.", "Saving")
    private: bool = setting(
        True, "Private Hub repo", "Create the Hub repo private (only when it does not exist "
        "yet).", "Saving")
    send_diffusers: bool = setting(
        True, "Send the diffusers folder", "Send the diffusers model too (what the card's "
        "from_pretrained snippet loads); off sends only the files above (smaller upload).",
        "Saving")


@dataclass
class ReleaseResult:
    """What :func:`make_release` wrote and where it sent it."""

    folder: Path  # <model dir>/release
    export: Path
    card: Path | None = None
    dehydrated: Path | None = None
    extracted: Path | None = None  # the LoRA extracted from a full fine-tune
    sent: list[str] = field(default_factory=list)  # where each item went (path or URL)
    lines: list[str] = field(default_factory=list)  # what happened, for people

    def __str__(self) -> str:
        return "\n".join(self.lines)


def release_folder(config: DreamBoothConfig) -> Path:
    """``<model dir>/release``: where :func:`make_release` writes."""
    return config.model_dir / RELEASE_FOLDER


def trained_model(config: DreamBoothConfig) -> Path:
    """The folder training saved: the diffusers folder, or for a LoRA run the folder of its
    LoRA file (with its params and training info); a clear error when there is none yet."""

    if config.use_lora:
        file = lora_file_path(config)
        if not file.is_file():
            raise ModelLoadError(f"no trained LoRA at {file}: train first (notebook 03), or "
                                 "set Models root and Model name to those of the run")
        return file.parent
    folder = config.model_dir / "model"
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"no trained model in {folder}: train first (notebook 03), or set "
                             "Models root and Model name to those of the run")
    return folder


def check_release(settings: ReleaseSettings) -> list[str]:
    """Problems with ``settings``, before any work (an empty list when there is none)."""

    problems = []
    name = settings.export_name.strip()
    if name and safe_name(name) != name:
        problems.append(f"Export file name {name!r}: use letters, digits, '.', '_', '-' and "
                        f"spaces only, e.g. {safe_name(name)!r}")
    if settings.dehydrate_rank is not None and settings.dehydrate_rank < 1:
        problems.append("Dehydrate rank: blank (lossless) or a whole number of at least 1")
    if settings.extract_lora and (settings.extract_rank < 1 or settings.extract_conv_rank < 0):
        problems.append("Extracted LoRA rank: at least 1; conv rank: 0 (none) or more")
    try:
        parse_destination(settings.destination)
    except StorageError as exc:
        problems.append(f"Send to: {exc}")
    return problems


def make_release(config: DreamBoothConfig, settings: ReleaseSettings, *,
                 grid=None, progress: bool = True,
                 on_status: Callable[[str], None] | None = None) -> ReleaseResult:
    """Export, describe, dehydrate and send the model ``config`` trained (see the module docs).

    ``grid`` (a PIL image or image file, e.g. :attr:`SampleResult.grid`) goes into the card.
    ``on_status(line)`` hears each step as it starts. Raises ``ValueError`` for bad settings
    before anything is written.
    """

    problems = check_release(settings)
    if problems:
        raise ConfigError([Problem("release", problem) for problem in problems])
    model = trained_model(config)
    folder = release_folder(config)
    folder.mkdir(parents=True, exist_ok=True)
    name = settings.export_name.strip() or safe_name(config.model_name)
    target = parse_destination(settings.destination)
    say = on_status or (lambda line: None)

    if config.use_lora:
        # The LoRA file is already what the WebUI, ComfyUI and diffusers load: copy it.
        say(f"Copying the LoRA as {name}.safetensors...")
        export = folder / f"{name}.safetensors"
        copy_file_atomic(lora_file_path(config), export)
        result = ReleaseResult(folder, export)
        result.lines.append(f"LoRA {export} ({human_size(export.stat().st_size)}): put it in "
                            "the WebUI's models/Lora, or load_lora_weights in diffusers.")
    else:
        say(f"Exporting {name}.safetensors ({'fp16' if settings.fp16 else 'fp32'})...")
        report = export_single_file(model, folder / f"{name}.safetensors", fp16=settings.fp16,
                                    ema=settings.ema, overwrite=True, progress=progress)
        result = ReleaseResult(folder, report.path)
        result.lines.append(f"Exported {report.path} ({human_size(report.size)}, "
                            f"{report.dtype}): load it in the WebUI/ComfyUI.")
    if settings.model_card:
        say("Writing the model card...")
        repo_id = target.repo_id if isinstance(target, HubRepo) else None
        result.card = write_model_card(model, folder / "README.md", grid=grid, repo_id=repo_id,
                                       lora_file=result.export.name if config.use_lora else None)
        result.lines.append(f"Model card: {result.card}")
    if settings.dehydrate and config.use_lora:
        result.lines.append("Dehydrate skipped: a LoRA file already holds only the change.")
    elif settings.dehydrate:
        say("Dehydrating (a pass over every weight)...")
        dehydrated = dehydrate(model, config.base_model, folder / f"{name}.dehydrated.safetensors",
                               rank=settings.dehydrate_rank, overwrite=True, progress=progress)
        result.dehydrated = dehydrated.path
        result.lines.append(dehydrated.summary())
    if settings.extract_lora and config.use_lora:
        result.lines.append("Extract a LoRA skipped: this run trained a LoRA already.")
    elif settings.extract_lora:
        say(f"Extracting a rank-{settings.extract_rank} LoRA (an SVD per layer)...")
        extracted = extract_lora(config.base_model, model,
                                 folder / f"{name}_lora_r{settings.extract_rank}.safetensors",
                                 rank=settings.extract_rank,
                                 conv_rank=settings.extract_conv_rank, overwrite=True,
                                 progress=progress)
        result.extracted = extracted.path
        result.lines.append("Extracted a LoRA: " + extracted.summary())
    if target is None:
        result.lines.append("Send to is blank: the files stay in " + str(folder))
        return result
    # The grid only when this card shows it: an earlier release's grid may still be there.
    shown_grid = folder / "samples.png" if result.card is not None and grid is not None else None
    items = [p for p in (result.export, result.card, shown_grid, result.dehydrated,
                         result.extracted) if p is not None]
    if settings.send_diffusers and not config.use_lora:
        hub = isinstance(target, HubRepo)
        items += [p for p in sorted(model.iterdir()) if not p.name.startswith(".")
                  and p.name != "README.md" and not (hub and p.name in PRIVATE_FILES)]
    # A folder destination gets one folder per model; a Hub repo gets the items at its root.
    where = settings.destination.strip() if isinstance(target, HubRepo) else str(target / name)
    for item in items:
        say(f"Sending {item.name} to {where}...")
        result.sent.append(publish(item, where, private=settings.private))
    result.lines.append(f"Sent {len(items)} item(s) to "
                        + (target.url if isinstance(target, HubRepo) else where))
    return result


def sample_model(config: DreamBoothConfig, prompt: str = "", *, pipe=None,
                 progress: bool = True):
    """Sample the trained model: each concept's sample settings, or ``prompt`` (when not
    blank) with the first concept's number, seed, CFG scale and steps. Returns the
    :class:`~colab_dreambooth.generation.sample.SampleResult` (shown inline as its grid)."""

    if pipe is None:
        pipe = load_trained_pipeline(config)
    if not prompt.strip():
        return sample_concepts(config, pipe=pipe, progress=progress)
    concept = config.concepts_list[0] if config.concepts_list else None
    n = concept.n_save_sample if concept else 1
    seed = concept.sample_seed if concept and concept.sample_seed >= 0 else \
        random.randrange(2**31)
    jobs = [SampleJob(" ".join(prompt.split()), seed + i,
                      concept.save_sample_negative_prompt.strip() if concept else "",
                      concept.save_guidance_scale if concept else 7.5,
                      concept.save_infer_steps if concept else 20,
                      config.resolution, config.resolution) for i in range(max(1, n))]
    return run_samples(pipe, jobs, config.model_dir / "samples", progress=progress)
