"""Class (regularization) images: generate with the base model the ones a concept still lacks.

For each concept with a class prompt and a Total Number of Class Images, the valid images
already in its class folder are counted (broken files do not count) and only the missing ones
are generated. Each image is written with its caption ``.txt`` so that training's
``[filewords]`` reads back the caption the image was generated from.

Writes are crash-safe: caption and image are first written in full under hidden temporary
names (which image checks skip), then renamed into place, caption first. A kill therefore never
leaves a half-written PNG under a real name, nor an image without its caption; an interrupted
run simply continues where it stopped. With a fixed Class image seed the k-th image of a folder
always gets seed + k, so the continued run makes the same images an uninterrupted one would
(at Class batch size 1; batching can change the last bit of a pixel).

Example::

    from colab_dreambooth.generation.class_images import generate_class_images
    for report in generate_class_images(config):
        print(report)
"""

from __future__ import annotations

import logging
import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from tqdm.auto import tqdm

from colab_dreambooth.config.params import resolve_concepts
from colab_dreambooth.config.prompts import FILEWORDS, PromptError, remove_token, tidy_prompt
from colab_dreambooth.data.captions import folder_captions
from colab_dreambooth.data.dataset import DataError
from colab_dreambooth.data.images import check_images
from colab_dreambooth.models.attention import set_memory_attention
from colab_dreambooth.models.loading import load_components
from colab_dreambooth.models.pipelines import pipeline_from_components

if TYPE_CHECKING:
    from PIL import Image

    from colab_dreambooth.config.concept import Concept
    from colab_dreambooth.config.settings import DreamBoothConfig

log = logging.getLogger(__name__)

NAME_PREFIX = "class"
TMP_SUFFIX = ".cdb-tmp"  # our temporary files: hidden, and removed when a later run finds them


@dataclass
class ClassImageReport:
    """What one concept's class folder held and what was added to it."""

    concept: int  # 0-based index into the config's concepts_list
    folder: Path
    wanted: int
    existing: int  # valid images found before generating
    generated: int = 0
    files: list[Path] = field(default_factory=list)  # the images written

    def __str__(self) -> str:
        if not self.generated:
            return (f"Concept {self.concept + 1}: {self.existing} class images already in "
                    f"{self.folder} ({self.wanted} wanted): nothing to generate")
        return (f"Concept {self.concept + 1}: generated {self.generated} class images (with "
                f"captions) into {self.folder}; {self.existing} were already there, "
                f"{self.wanted} wanted")


@dataclass
class _Plan:
    """The generation work of one concept, worked out before any model is loaded."""

    report: ClassImageReport
    concept: "Concept"
    captions: list[str]  # instance captions for [filewords], token removed; empty otherwise

    @property
    def missing(self) -> int:
        return max(0, self.report.wanted - self.report.existing)

    def prompt_and_caption(self, k: int) -> tuple[str, str]:
        """The generation prompt of the folder's k-th image, and the caption saved with it."""
        template = self.concept.class_prompt
        if not self.captions:
            prompt = tidy_prompt(template)
            return prompt, prompt
        caption = self.captions[k % len(self.captions)]
        return tidy_prompt(FILEWORDS.sub(lambda _: caption, template)), caption


def generate_class_images(config: "DreamBoothConfig", *, progress: bool = True,
                          stop: threading.Event | None = None,
                          on_image: Callable[[Path], None] | None = None
                          ) -> list[ClassImageReport]:
    """Generate the class images every concept still lacks; return one report per concept.

    Only concepts with a class prompt and Total Number of Class Images > 0 are handled. When
    every class folder is complete nothing is generated and no model is loaded. ``stop`` (a
    notebook's Stop button) ends the run between batches; ``on_image(path)`` is called after
    each image is in place. Raises :class:`~colab_dreambooth.data.dataset.DataError` (before loading
    the model) when a ``[filewords]`` class prompt has no instance captions to draw on.
    """
    config = resolve_concepts(config)
    plans = _plan(config)
    missing = sum(p.missing for p in plans)
    if not missing:
        return [p.report for p in plans]

    pipe = _pipeline(config)
    filled: set[Path] = set()
    try:
        with tqdm(total=missing, desc="Class images", unit="image", disable=not progress) as bar:
            for plan in plans:
                if plan.report.folder.resolve() in filled:
                    # Concepts sharing a class folder: count what the earlier one added.
                    before = plan.missing
                    plan.report.existing = len(check_images(plan.report.folder,
                                                            config.resolution)[0])
                    bar.total -= before - plan.missing
                    bar.refresh()
                _generate(pipe, config, plan, bar, stop, on_image)
                filled.add(plan.report.folder.resolve())
                if stop is not None and stop.is_set():
                    break
    finally:
        _release(pipe)
    return [p.report for p in plans]


# ----------------------------------------------------------------------------- planning
def _plan(config: "DreamBoothConfig") -> list[_Plan]:
    """Count each class folder's valid images and gather [filewords] captions; no model."""
    plans, problems = [], []
    for index, concept in enumerate(config.concepts_list):
        if not concept.class_prompt.strip() or concept.num_class_images <= 0:
            continue
        folder = config.class_dir(index)
        if folder.exists() and not folder.is_dir():
            problems.append(f"concept {index + 1}: the class folder {folder} is a file: give a "
                            "folder (or leave it blank to use the model's classifiers folder)")
            continue
        existing = len(check_images(folder, config.resolution)[0]) if folder.is_dir() else 0
        report = ClassImageReport(index, folder, concept.num_class_images, existing)
        captions: list[str] = []
        if FILEWORDS.search(concept.class_prompt) and existing < concept.num_class_images:
            captions = _instance_captions(config, index, problems)
        plans.append(_Plan(report, concept, captions))
    if problems:
        raise DataError(problems)
    return plans


def _instance_captions(config: "DreamBoothConfig", index: int, problems: list[str]) -> list[str]:
    """The captions of concept ``index``'s instance images with its instance token removed."""
    concept = config.concepts_list[index]
    label = f"concept {index + 1}"
    why = "its class prompt holds [filewords], which takes the instance images' captions"
    if not concept.instance_data_dir.strip():
        problems.append(f"{label}: the Instance dataset directory is blank but {why}: set it, "
                        "or write the class prompt without [filewords]")
        return []
    try:
        captions = folder_captions(concept.instance_data_dir, config.resolution, concept=label)
    except PromptError as exc:  # a caption file that is not UTF-8
        problems.append(str(exc))
        return []
    if not captions:
        folder = Path(concept.instance_data_dir).expanduser()
        problems.append(f"{label}: the instance folder {folder} holds no usable image but "
                        f"{why}: fix the folder (see check-data), or write the class prompt "
                        "without [filewords]")
    return [remove_token(caption.text, concept.instance_token) for caption in captions]


# ----------------------------------------------------------------------------- generating
def _pipeline(config: "DreamBoothConfig"):
    """A ``StableDiffusionPipeline`` of the base model, on the GPU unless Use CPU Only."""
    import torch


    on_cuda = torch.cuda.is_available() and not config.use_cpu
    parts = load_components(config.base_model, vae=config.pretrained_vae_name_or_path)
    pipe = pipeline_from_components(parts)
    if on_cuda:
        set_memory_attention(parts.unet, config.attention, on_cuda)
        dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float16
        pipe.to("cuda", dtype)
    return pipe


def _release(pipe) -> None:
    """Free the base model's GPU memory so training can start in the same session."""
    import gc

    import torch

    pipe.to("cpu")
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _generate(pipe, config: "DreamBoothConfig", plan: _Plan, bar, stop: threading.Event | None,
              on_image: Callable[[Path], None] | None) -> None:
    import torch

    report, concept = plan.report, plan.concept
    folder = report.folder
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(folder)
    base_seed = concept.class_seed
    if base_seed < 0:
        base_seed = random.randrange(2**31)
        log.info("Concept %d: class image seed %d", report.concept + 1, base_seed)
    names = _free_names(folder)
    while report.existing + report.generated < report.wanted:
        if stop is not None and stop.is_set():
            log.warning("Stopped: %s", report)
            return
        first = report.existing + report.generated
        ks = range(first, min(report.wanted, first + config.sample_batch_size))
        prompts, captions = zip(*(plan.prompt_and_caption(k) for k in ks))
        seeds = [base_seed + k for k in ks]
        negative = concept.class_negative_prompt.strip()
        images = pipe(
            list(prompts), negative_prompt=[negative] * len(ks) if negative else None,
            num_inference_steps=concept.class_infer_steps,
            guidance_scale=concept.class_guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            height=config.resolution, width=config.resolution).images
        for image, prompt, caption, seed in zip(images, prompts, captions, seeds):
            parameters = (f"{prompt}\nNegative prompt: {negative}\nSteps: "
                          f"{concept.class_infer_steps}, CFG scale: "
                          f"{concept.class_guidance_scale}, Seed: {seed}, "
                          f"Size: {image.width}x{image.height}")
            path = write_captioned_image(image, caption, folder, next(names), parameters)
            report.generated += 1
            report.files.append(path)
            bar.update(1)
            if on_image is not None:
                on_image(path)


def _free_names(folder: Path):
    """Yield ``class-00000``, ``class-00001``, ... skipping every stem already in the folder
    (whatever its extension), so no user file and no earlier image is ever overwritten."""
    used = {p.stem.lower() for p in folder.iterdir()}
    k = 0
    while True:
        stem = f"{NAME_PREFIX}-{k:05d}"
        if stem.lower() not in used:
            used.add(stem.lower())
            yield stem
        k += 1


def write_captioned_image(image: "Image.Image", caption: str, folder: Path, stem: str,
                          parameters: str = "") -> Path:
    """Write ``<stem>.txt`` and ``<stem>.png`` crash-safely; return the image's path.

    Both are written in full under hidden temporary names, then renamed caption first: an image
    never appears without its caption, nor half-written. ``parameters`` goes into the PNG's
    text chunk (the WebUI's ``parameters`` key), so the image says how it was made.
    """
    from PIL.PngImagePlugin import PngInfo

    image_path, caption_path = folder / f"{stem}.png", folder / f"{stem}.txt"
    tmp_image = folder / f".{stem}.png{TMP_SUFFIX}"
    tmp_caption = folder / f".{stem}.txt{TMP_SUFFIX}"
    try:
        with open(tmp_caption, "w", encoding="utf-8") as f:
            f.write(caption + "\n")
            f.flush()
            os.fsync(f.fileno())
        info = PngInfo()
        if parameters:
            info.add_text("parameters", parameters)
        with open(tmp_image, "wb") as f:
            _save_png(image, f, info)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_caption, caption_path)
        os.replace(tmp_image, image_path)
    except BaseException:
        tmp_caption.unlink(missing_ok=True)
        tmp_image.unlink(missing_ok=True)
        raise
    return image_path


def _save_png(image: "Image.Image", f, info) -> None:
    image.save(f, format="PNG", pnginfo=info)


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete temporary files a killed run left (only ours: hidden, with our suffix)."""
    for path in folder.glob(f".*{TMP_SUFFIX}"):
        path.unlink(missing_ok=True)


