"""An end-to-end run anyone can start offline: a synthetic subject, class images, the tiny model.

The subject is a drawn yellow star ("zwx toy") on varied backgrounds, each image with a caption;
the class images are other drawn toys. Training uses ``[filewords]`` prompts, prior preservation
and text-encoder training, so every stage of a real run is exercised in a couple of minutes on
a CPU.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

from colab_dreambooth.config.concept import Concept
from colab_dreambooth.config.params import save_params
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.generation.sample import generate_samples, image_grid, save_images
from colab_dreambooth.models.pipelines import load_pipeline
from colab_dreambooth.training.train import train

if TYPE_CHECKING:
    from colab_dreambooth.training.train import TrainResult

BACKGROUNDS = {"green": (60, 150, 70), "blue": (50, 90, 170), "grey": (128, 128, 128),
               "white": (240, 240, 240), "pink": (220, 140, 170), "brown": (120, 80, 50)}
TOY_SHAPES = ("ball", "block", "ring", "cone")
TOY_COLOURS = {"red": (200, 40, 40), "purple": (120, 60, 160), "orange": (230, 130, 30),
               "teal": (30, 150, 150)}


def make_demo_data(root: Path, *, instance_images: int = 6, class_images: int = 12,
                   size: int = 128, seed: int = 0) -> tuple[Path, Path]:
    """Draw the subject and class images with captions into ``root``; return both folders."""
    rng = random.Random(seed)
    instance_dir, class_dir = root / "instance", root / "class"
    instance_dir.mkdir(parents=True, exist_ok=True)
    class_dir.mkdir(parents=True, exist_ok=True)
    for i in range(instance_images):
        name, colour = rng.choice(list(BACKGROUNDS.items()))
        image = Image.new("RGB", (size, size), colour)
        _draw_star(ImageDraw.Draw(image), rng, size)
        image.save(instance_dir / f"star_{i:02d}.png")
        (instance_dir / f"star_{i:02d}.txt").write_text(
            f"a photo of a toy on a {name} background", encoding="utf-8")
    for i in range(class_images):
        name, colour = rng.choice(list(BACKGROUNDS.items()))
        shape = TOY_SHAPES[i % len(TOY_SHAPES)]
        toy_colour = rng.choice(list(TOY_COLOURS))
        image = Image.new("RGB", (size, size), colour)
        _draw_toy(ImageDraw.Draw(image), rng, size, shape, TOY_COLOURS[toy_colour])
        image.save(class_dir / f"toy_{i:02d}.png")
        (class_dir / f"toy_{i:02d}.txt").write_text(
            f"a photo of a toy on a {name} background", encoding="utf-8")
    return instance_dir, class_dir


def demo_config(root: Path, *, steps: int = 60, resolution: int = 64) -> DreamBoothConfig:
    """The demo's configuration: the tiny model, one concept with prior preservation."""
    instance_dir, class_dir = root / "data" / "instance", root / "data" / "class"
    return DreamBoothConfig(
        model_name="demo-star", pretrained_model_name_or_path="tiny", models_root=str(root),
        max_train_steps=steps, learning_rate=1e-3, text_encoder_learning_rate=5e-4,
        lr_scheduler="constant_with_warmup", lr_warmup_steps=5, resolution=resolution,
        seed=1234, train_batch_size=2, mixed_precision="no", train_text_encoder=True,
        prior_loss_weight=1.0, use_cpu=True, use_8bit_adam=False,
        concepts_list=[Concept(
            instance_prompt="[filewords]", class_prompt="[filewords]",
            instance_data_dir=str(instance_dir), class_data_dir=str(class_dir),
            instance_token="zwx", class_token="a toy, toy", file_prompt_contents="Description",
            num_class_images=12, save_sample_prompt="a photo of zwx toy", n_save_sample=2,
            sample_seed=7, save_infer_steps=10)])


def _draw_star(draw: ImageDraw.ImageDraw, rng: random.Random, size: int) -> None:
    cx, cy = rng.uniform(0.35, 0.65) * size, rng.uniform(0.35, 0.65) * size
    outer, inner = rng.uniform(0.25, 0.35) * size, None
    inner = outer * 0.45
    turn = rng.uniform(0, 2 * math.pi)
    points = [(cx + (outer if k % 2 == 0 else inner) * math.cos(turn + k * math.pi / 5),
               cy + (outer if k % 2 == 0 else inner) * math.sin(turn + k * math.pi / 5))
              for k in range(10)]
    draw.polygon(points, fill=(250, 210, 40), outline=(30, 60, 200), width=max(2, size // 40))


def _draw_toy(draw: ImageDraw.ImageDraw, rng: random.Random, size: int, shape: str,
              colour: tuple[int, int, int]) -> None:
    cx, cy = rng.uniform(0.35, 0.65) * size, rng.uniform(0.35, 0.65) * size
    r = rng.uniform(0.2, 0.3) * size
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "ball":
        draw.ellipse(box, fill=colour)
    elif shape == "block":
        draw.rectangle(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(3, size // 16))
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)


def run_demo(out: str | Path = "demo-output", *, steps: int = 150, save_every: int = 0,
             resume: bool = False, model: str = "tiny") -> "TrainResult":
    """Make the data, train the tiny model, sample it, and print what was made where.

    ``save_every`` writes a checkpoint every that many steps; ``resume`` continues the run
    already in ``out`` from its newest checkpoint (stop the demo with Ctrl-C to try it);
    ``model`` is ``tiny`` or ``tiny-sdxl`` (the same run on the SDXL-shaped model).
    Returns the training result (``stopped_early`` when it was stopped)."""
    import time

    started = time.time()
    root = Path(out).resolve()
    if resume and (root / "data").is_dir():
        instance_dir, class_dir = root / "data" / "instance", root / "data" / "class"
    else:
        instance_dir, class_dir = make_demo_data(root / "data")
    config = demo_config(root, steps=steps).copy(save_every_steps=save_every,
                                                 pretrained_model_name_or_path=model)
    params = save_params(config, root / "params.json")
    result = train(config, resume=resume)

    pipe = load_pipeline(result.model_dir, device="cpu")
    prompts = ["a photo of zwx toy", "a photo of a toy"]
    images, labels = [], []
    for prompt in prompts:
        images += generate_samples(pipe, prompt, n=2, seed=7, steps=10, progress=False)
        labels += [prompt] * 2
    samples = save_images(images, root / "samples", "sample")
    grid = root / "samples" / "grid.png"
    image_grid(images, labels, columns=2).save(grid)

    command = command_name()
    print("\nDemo finished in {:.0f} s.".format(time.time() - started))
    print(f"  instance images (with .txt captions): {instance_dir}")
    print(f"  class images:                         {class_dir}")
    print(f"  parameters JSON:                      {params}")
    print(f"  trained model (diffusers folder):     {result.model_dir}")
    print(f"  samples ({len(samples)} PNGs and a grid):    {grid}")
    if result.losses:
        tail = result.losses[-10:]
        print(f"  steps {result.steps}, loss {result.losses[0]:.3f} -> "
              f"{sum(tail) / len(tail):.3f} (mean of the last {len(tail)})")
    if result.stopped_early:
        print(f"  stopped at step {result.steps}: continue with  {command} demo --out "
              f"{out} --steps {steps}{f' --save-every {save_every}' if save_every else ''} "
              "--resume")
    print(f"Train on this data again with:  {command} train --config {params}")
    return result


def command_name() -> str:
    """How to call the command line from the user's shell: ``colab-dreambooth`` when that is
    on PATH and is this installation, else the script's path (a virtualenv that is not
    activated: ``.venv/bin/colab-dreambooth``), else ``python -m colab_dreambooth``."""
    import os
    import shutil
    import sys

    script = Path(sys.executable).parent / ("colab-dreambooth.exe" if os.name == "nt"
                                            else "colab-dreambooth")
    found = shutil.which("colab-dreambooth")
    if found and script.exists() and Path(found).resolve() == script.resolve():
        return "colab-dreambooth"
    if script.exists():
        try:
            return str(script.relative_to(Path.cwd()))
        except ValueError:
            return str(script)
    return f"{sys.executable} -m colab_dreambooth"
