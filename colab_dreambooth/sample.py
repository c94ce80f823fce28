"""Generate images from a trained (or base) model and lay them out in a labelled grid."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm


def load_pipeline(model_dir: str | Path, device: str | None = None):
    """A ``StableDiffusionPipeline`` from a diffusers folder, on the GPU when there is one."""
    from diffusers import StableDiffusionPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), dtype=dtype,
                                                   safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate_samples(pipe, prompt: str, *, n: int = 1, seed: int = -1,
                     negative_prompt: str = "", guidance_scale: float = 7.5, steps: int = 20,
                     height: int | None = None, width: int | None = None,
                     progress: bool = True) -> list[Image.Image]:
    """``n`` images of ``prompt``; the same seed gives the same images (seed -1 = random)."""
    images = []
    for i in tqdm(range(n), desc="Sampling", disable=not progress or n < 2):
        generator = None
        if seed >= 0:
            generator = torch.Generator("cpu").manual_seed(seed + i)
        images += pipe(prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                       guidance_scale=guidance_scale, generator=generator, height=height,
                       width=width).images
    return images


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


def save_images(images: list[Image.Image], out_dir: str | Path, prefix: str) -> list[Path]:
    """Save images as ``<prefix>-<k>.png``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, image in enumerate(images):
        path = out_dir / f"{prefix}-{k:03d}.png"
        image.save(path)
        paths.append(path)
    return paths
