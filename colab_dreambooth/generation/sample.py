"""Generate images from a trained (or base) model and lay them out in a labelled grid.

The test stage after training is :func:`sample_concepts`: each concept's sample prompt (blank =
its instance prompt; ``[filewords]`` filled from its instance captions, rewritten as training
rewrites them; or one prompt per line of its Sample Prompt Template File) with its sample
negative prompt, number of samples, seed, CFG scale and steps. The PNGs and one labelled grid
are saved; the returned :class:`SampleResult` shows the grid inline in a notebook.

Example::

    result = sample_concepts(config)   # the model train() saved under config.model_dir
    result                             # a notebook cell shows the grid
    result.paths, result.grid_path
"""

from __future__ import annotations

import io
import os
import random
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from colab_dreambooth.config.params import resolve_concepts
from colab_dreambooth.config.prompts import FILEWORDS, PromptError, build_prompts
from colab_dreambooth.data.captions import Caption, folder_captions
from colab_dreambooth.data.dataset import DataError
from colab_dreambooth.errors import ConfigError, Problem
from colab_dreambooth.models.pipelines import (
    load_pipeline,
    load_trained_pipeline,
    pipeline_text_encoder,
)
from colab_dreambooth.models.text_encoding import encode_token_ids, prompt_token_ids

if TYPE_CHECKING:
    from colab_dreambooth.config.settings import DreamBoothConfig


def generate_samples(pipe, prompt: str, *, n: int = 1, seed: int = -1,
                     negative_prompt: str = "", guidance_scale: float = 7.5, steps: int = 20,
                     height: int | None = None, width: int | None = None,
                     progress: bool = True, clip_skip: int = 1,
                     max_token_length: int = 75) -> list[Image.Image]:
    """``n`` images of ``prompt``; the same seed gives the same images (seed -1 = random).

    Image ``i`` is drawn with seed ``seed + i`` (a CPU generator, so the noise is the same on
    any device). ``clip_skip`` and ``max_token_length`` are the training's Clip Skip and Max
    Token Length: the prompts are then encoded as training encodes them.
    """
    text = {"prompt": prompt, "negative_prompt": negative_prompt or None}
    if clip_skip > 1 or max_token_length > 75:
        text = _prompt_embeds(pipe, prompt, negative_prompt, clip_skip, max_token_length)
    images = []
    for i in tqdm(range(n), desc="Sampling", disable=not progress or n < 2):
        generator = None
        if seed >= 0:
            generator = torch.Generator("cpu").manual_seed(seed + i)
        images += pipe(**text, num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=generator, height=height, width=width).images
    return images


@torch.no_grad()
def _prompt_embeds(pipe, prompt: str, negative_prompt: str, clip_skip: int,
                   max_token_length: int) -> dict:
    """Prompt and negative-prompt states as training makes them (75-token chunks, clip
    skip), padded to the same length so classifier-free guidance can pair them; for SDXL also
    the pooled embeddings (a blank negative prompt gives zeros where the model asks for it,
    as its pipeline does)."""
    text_encoder = pipeline_text_encoder(pipe)
    tokenizers = (pipe.tokenizer,) + ((pipe.tokenizer_2,) if text_encoder is not
                                      pipe.text_encoder else ())
    positive, negative = (
        encode_token_ids(text_encoder, prompt_token_ids(tokenizers, [text],
                                                        max_token_length=max_token_length),
                         clip_skip) for text in (prompt, negative_prompt or ""))
    embeds = {"prompt_embeds": positive.states, "negative_prompt_embeds": negative.states}
    if positive.pooled is not None:
        if not negative_prompt and pipe.config.get("force_zeros_for_empty_prompt", False):
            negative.states.zero_()
            negative.pooled.zero_()
        embeds.update(pooled_prompt_embeds=positive.pooled,
                      negative_pooled_prompt_embeds=negative.pooled)
    return embeds


# ----------------------------------------------------------------------------- sample runs
@dataclass(frozen=True)
class SampleJob:
    """One image to generate: its prompt and everything else that decides its pixels."""

    prompt: str
    seed: int
    negative_prompt: str = ""
    guidance_scale: float = 7.5
    steps: int = 20
    height: int | None = None
    width: int | None = None

    def parameters(self, size: tuple[int, int]) -> str:
        """How the image was made, in the WebUI's ``parameters`` text layout."""
        return (f"{self.prompt}\nNegative prompt: {self.negative_prompt}\nSteps: {self.steps}, "
                f"CFG scale: {self.guidance_scale}, Seed: {self.seed}, "
                f"Size: {size[0]}x{size[1]}")


@dataclass
class SampleResult:
    """Images generated in one sample run, where they were saved, and their labelled grid.

    In a notebook the result itself displays as the grid.
    """

    images: list[Image.Image]
    jobs: list[SampleJob]
    paths: list[Path]
    grid: Image.Image
    grid_path: Path
    labels: list[str] = field(default_factory=list)

    @property
    def prompts(self) -> list[str]:
        """The prompt of each image."""
        return [job.prompt for job in self.jobs]

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.grid.save(buffer, format="PNG")
        return buffer.getvalue()


def concept_sample_jobs(config: "DreamBoothConfig", index: int, *,
                        seed: int | None = None) -> list[SampleJob]:
    """The sample images of concept ``index`` (0-based), as its sample fields describe them.

    Prompts: each line of the Sample Prompt Template File when set, else the sample prompt,
    else the instance prompt. Each prompt gets Number of Samples images; image ``i`` of a
    prompt uses seed ``Sample Seed + i`` (so different prompts are compared on the same noise).
    ``[filewords]`` is filled with the concept's instance captions in turn (image ``i`` takes
    caption ``i``), rewritten as in training. Sample Seed -1 draws one random seed (or takes
    ``seed``) and reports it in each job.
    """
    concept = config.concepts_list[index]
    label = f"concept {index + 1}"
    templates = _template_prompts(concept.save_sample_template, label) \
        if concept.save_sample_template.strip() else \
        [concept.save_sample_prompt.strip() or concept.instance_prompt.strip()]
    if not any(templates):
        raise PromptError("the sample prompt and the instance prompt are both blank: set a "
                          "Sample Image Prompt", concept=label)
    base = concept.sample_seed if concept.sample_seed >= 0 else (
        seed if seed is not None else random.randrange(2**31))
    captions = None
    jobs = []
    for template in templates:
        for i in range(concept.n_save_sample):
            prompt = template
            if FILEWORDS.search(template):
                if captions is None:
                    captions = _instance_captions(config, index)
                prompt = _build_instance_prompt(concept, captions[i % len(captions)], template,
                                                label)
            jobs.append(SampleJob(prompt, base + i, concept.save_sample_negative_prompt.strip(),
                                  concept.save_guidance_scale, concept.save_infer_steps,
                                  config.resolution, config.resolution))
    return jobs


def sample_concepts(config: "DreamBoothConfig", model: str | Path | None = None, *,
                    out_dir: str | Path | None = None, pipe=None, device: str | None = None,
                    columns: int | None = None, progress: bool = True) -> SampleResult:
    """Sample every concept of ``config`` with a trained model; save PNGs and a labelled grid.

    ``model`` defaults to the folder training saved (``<model dir>/model``), ``out_dir`` to
    ``<model dir>/samples``. Files never overwrite earlier samples: each run takes the next
    free ``sample-NNN`` prefix. All prompts are built (and their errors raised) before the
    model is loaded; a ``pipe`` already loaded may be passed instead.
    """

    config = resolve_concepts(config)
    jobs = [job for index in range(len(config.concepts_list))
            for job in concept_sample_jobs(config, index)]
    if not jobs:
        raise ConfigError([Problem("n_save_sample", "no sample to generate: every concept's "
                                   "Number of Samples to Generate is 0")])
    if pipe is None:
        if model is None:
            pipe = load_trained_pipeline(config, device)
        else:
            pipe = load_pipeline(model, device or ("cpu" if config.use_cpu else None))
    return run_samples(pipe, jobs, out_dir or config.model_dir / "samples", columns=columns,
                       progress=progress, clip_skip=config.clip_skip,
                       max_token_length=config.max_token_length)


def run_samples(pipe, jobs: list[SampleJob], out_dir: str | Path, *, prefix: str = "sample",
                columns: int | None = None, progress: bool = True, clip_skip: int = 1,
                max_token_length: int = 75) -> SampleResult:
    """Generate ``jobs``, save each as a PNG (its parameters in the PNG text) and a grid
    labelled with the prompts, under the next free ``<prefix>-NNN`` name in ``out_dir``."""
    images = []
    for job in tqdm(jobs, desc="Sampling", unit="image", disable=not progress):
        images += generate_samples(pipe, job.prompt, n=1, seed=job.seed,
                                   negative_prompt=job.negative_prompt,
                                   guidance_scale=job.guidance_scale, steps=job.steps,
                                   height=job.height, width=job.width, progress=False,
                                   clip_skip=clip_skip, max_token_length=max_token_length)
    out_dir = Path(out_dir)
    run_prefix = _free_prefix(out_dir, prefix)
    paths = save_images(images, out_dir, run_prefix,
                        parameters=[job.parameters(im.size) for job, im in zip(jobs, images)])
    labels = [job.prompt for job in jobs]
    grid = image_grid(images, labels, columns=columns)
    grid_path = out_dir / f"{run_prefix}-grid.png"
    save_image_atomic(grid, grid_path)
    return SampleResult(images, jobs, paths, grid, grid_path, labels)


def _template_prompts(template_file: str, label: str) -> list[str]:
    """The non-blank lines of a Sample Prompt Template File."""
    path = Path(template_file).expanduser()
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise PromptError(f"the Sample Prompt Template File {path} does not exist: fix the path "
                          "or clear it to use the sample prompt", concept=label) from None
    except UnicodeDecodeError:
        raise PromptError(f"the Sample Prompt Template File {path} is not UTF-8 text: save it "
                          "with UTF-8 encoding", concept=label) from None
    prompts = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptError(f"the Sample Prompt Template File {path} holds no prompt: write one "
                          "prompt per line", concept=label)
    return prompts


def _instance_captions(config: "DreamBoothConfig", index: int) -> list[Caption]:
    """The captions of concept ``index``'s usable instance images; DataError when none."""
    concept = config.concepts_list[index]
    label = f"concept {index + 1}"
    captions = []
    if concept.instance_data_dir.strip():
        captions = folder_captions(concept.instance_data_dir, config.resolution, concept=label)
    if not captions:
        raise DataError([f"{label}: the sample prompt holds [filewords] but the instance "
                         f"folder '{concept.instance_data_dir}' has no usable image to take "
                         "captions from: fix the folder or write the sample prompt out"])
    return captions


def _build_instance_prompt(concept, caption: Caption, template: str, label: str) -> str:
    """``template`` with ``[filewords]`` filled from ``caption`` as training fills it."""
    return build_prompts(caption.text, template, "", concept.instance_token,
                         concept.class_token, concept.file_prompt_contents,
                         caption_file=caption.source, concept=label)[0]


def _free_prefix(out_dir: Path, prefix: str) -> str:
    """``<prefix>-001``, ``-002``, ...: the first that no file in ``out_dir`` starts with."""
    numbered = re.compile(rf"{re.escape(prefix)}-(\d+)-")
    taken = {int(m.group(1)) for p in (out_dir.iterdir() if out_dir.is_dir() else ())
             if (m := numbered.match(p.name))}
    k = 1
    while k in taken:
        k += 1
    return f"{prefix}-{k:03d}"


# ----------------------------------------------------------------------------- grid and files
def image_grid(images: list[Image.Image], labels: list[str] | None = None,
               columns: int | None = None) -> Image.Image:
    """Images in a grid, each with its label (e.g. the prompt) written under it."""
    if not images:
        raise ValueError("no images to lay out")
    columns = columns or min(4, len(images))
    rows = -(-len(images) // columns)
    w, h = images[0].size
    font = ImageFont.load_default()
    label_lines = 0
    wrapped = []
    for label in labels or [""] * len(images):
        lines = textwrap.wrap(label, width=max(8, w // 7)) if label else []
        wrapped.append(lines)
        label_lines = max(label_lines, len(lines))
    label_h = 12 * label_lines + (4 if label_lines else 0)
    grid = Image.new("RGB", (columns * w, rows * (h + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (image, lines) in enumerate(zip(images, wrapped)):
        x, y = (k % columns) * w, (k // columns) * (h + label_h)
        grid.paste(image.resize((w, h)), (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 2, y + h + 2 + 12 * j), line, fill="black", font=font)
    return grid


def save_images(images: list[Image.Image], out_dir: str | Path, prefix: str, *,
                parameters: list[str] | None = None) -> list[Path]:
    """Save images as ``<prefix>-<k>.png`` (each written whole, then renamed); return paths.

    ``parameters[k]`` (optional) goes into image k's PNG text, as the WebUI does.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, image in enumerate(images):
        path = out_dir / f"{prefix}-{k:03d}.png"
        save_image_atomic(image, path, parameters[k] if parameters else "")
        paths.append(path)
    return paths


def save_image_atomic(image: Image.Image, path: str | Path, parameters: str = "") -> Path:
    """Write ``image`` as a PNG to a hidden temporary file beside ``path``, then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


