"""The image commands: ``class-images``, ``sample`` and ``model-card``."""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from colab_dreambooth.cli.options import (
    add_config_options,
    add_settings_options,
    config_from_args,
    settings_from_args,
)
from colab_dreambooth.config.commands import SampleSettings
from colab_dreambooth.errors import ModelLoadError
from colab_dreambooth.generation.class_images import generate_class_images
from colab_dreambooth.generation.sample import SampleJob, run_samples
from colab_dreambooth.models.pipelines import load_lora_pipeline, load_pipeline, lora_run
from colab_dreambooth.publish.model_card import ModelCardError, write_model_card


def add_class_images(subparsers) -> argparse.ArgumentParser:
    """Register ``colab-dreambooth class-images --config params.json [overrides]``."""
    p = subparsers.add_parser(
        "class-images", help="generate the class (regularization) images the concepts lack",
        description="Generate, with the base model, the class images each concept still "
                    "lacks (existing valid images are kept and counted).")
    add_config_options(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=_run_class_images)
    return p


def _run_class_images(args: argparse.Namespace) -> int:
    try:
        reports = generate_class_images(config_from_args(args), progress=not args.no_progress)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not reports:
        print("No concept asks for class images (set a class prompt and Total Number of "
              "Class/Reg Images).")
    for report in reports:
        print(report)
    return 0


def add_sample(subparsers) -> argparse.ArgumentParser:
    """Register ``colab-dreambooth sample MODEL_DIR --prompt TEXT ... --out DIR``."""
    p = subparsers.add_parser(
        "sample", help="generate images from a trained model (PNGs and a labelled grid)",
        description="Generate images from a trained model: N images per prompt, saved as "
                    "PNGs plus one grid labelled with the prompts.")
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="the trained diffusers folder (or the model's working folder, 'tiny', "
                        "a .safetensors/.ckpt file, a Hub id); for a LoRA: its base model, or "
                        "the LoRA run's folder (base and LoRA file are then read from it)")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt to sample (repeat for several)")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs and the grid")
    add_settings_options(p, SampleSettings, lora={"metavar": "FILE"})
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=_run_sample)
    return p


def _run_sample(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, SampleSettings)
    if settings.n < 1 or settings.steps < 1:
        print("error: --n and --steps must be at least 1", file=sys.stderr)
        return 2
    for side in (settings.height, settings.width):
        if side is not None and (side < 64 or side % 8):
            print("error: --height and --width must be multiples of 8, at least 64",
                  file=sys.stderr)
            return 2
    base, lora = args.model_dir, settings.lora
    if lora is None and not (Path(base).expanduser() / "model" / "model_index.json").is_file():
        found = lora_run(base)  # a LoRA run's folder: its base model and its file
        if found:
            base, lora = found
            print(f"A LoRA run: sampling {lora} on its base model {base}")
    if lora is not None and not Path(lora).expanduser().is_file():
        raise ModelLoadError(f"LoRA file {lora} not found: a LoRA run writes "
                             "<models root>/dreambooth/<model name>/lora/<model name>.safetensors")
    seed = settings.seed if settings.seed >= 0 else random.randrange(2**31)
    jobs = [SampleJob(prompt, seed + i, settings.negative_prompt, settings.guidance_scale,
                      settings.steps, settings.height, settings.width)
            for prompt in args.prompt for i in range(settings.n)]
    if lora is not None:
        pipe = load_lora_pipeline(base, Path(lora).expanduser(), scale=settings.lora_scale)
    else:
        pipe = load_pipeline(base)
    result = run_samples(pipe, jobs, args.out, columns=settings.columns,
                         progress=not args.no_progress)
    for path, job in zip(result.paths, result.jobs):
        print(f"{path}  (seed {job.seed}) {job.prompt}")
    print(f"{result.grid_path}  (grid of {len(result.paths)} images)")
    return 0


def add_model_card(subparsers) -> argparse.ArgumentParser:
    """Register ``colab-dreambooth model-card MODEL_DIR [--grid IMAGE] [--repo-id ID]``."""
    p = subparsers.add_parser("model-card", help="write a Hugging Face Hub README.md for a "
                              "trained model folder")
    p.add_argument("model_dir", metavar="MODEL_DIR", type=Path,
                   help="the trained diffusers folder (holds params.json)")
    p.add_argument("--out", type=Path, default=None,
                   help="where to write the card (default: MODEL_DIR/README.md)")
    p.add_argument("--grid", type=Path, default=None, help="sample grid image to show")
    p.add_argument("--repo-id", default=None, help="the Hub repository, for the usage snippet")
    p.set_defaults(run=_run_model_card)
    return p


def _run_model_card(args: argparse.Namespace) -> int:
    try:
        path = write_model_card(args.model_dir, args.out, grid=args.grid, repo_id=args.repo_id)
    except ModelCardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Wrote the model card {path}")
    return 0
