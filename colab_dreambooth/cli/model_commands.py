"""The model-file commands: ``create-model``, ``export``, ``dehydrate`` and ``rehydrate``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from colab_dreambooth.cli.options import add_settings_options
from colab_dreambooth.config.commands import (
    CreateModelSettings,
    DehydrateSettings,
    ExportSettings,
)
from colab_dreambooth.errors import ModelLoadError
from colab_dreambooth.models.single_file.convert import convert_single_file
from colab_dreambooth.models.single_file.dehydrate import dehydrate
from colab_dreambooth.models.single_file.dehydrate_codec import DEFAULT_RANK
from colab_dreambooth.models.single_file.dehydrated_file import DehydrateError
from colab_dreambooth.models.single_file.export import export_single_file
from colab_dreambooth.models.single_file.readers import ModelFileError
from colab_dreambooth.models.single_file.rehydrate import rehydrate
from colab_dreambooth.publish.model_card import write_model_card


def add_create_model(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``create-model FILE OUT_DIR [--v-prediction|--epsilon] [--fp16] [--ema]``."""
    p = subparsers.add_parser(
        "create-model", help="convert a .safetensors/.ckpt checkpoint into a diffusers folder",
        description="Create Model: convert an SD 1.x/2.x/XL single-file checkpoint into a "
                    "diffusers folder, offline and within Colab's memory.")
    p.add_argument("file", type=Path, help="the .safetensors or .ckpt file")
    p.add_argument("out_dir", type=Path, help="the diffusers folder to create")
    pred = p.add_mutually_exclusive_group()
    pred.add_argument("--v-prediction", dest="v_prediction", action="store_const", const=True,
                      default=None, help="the model predicts v (SD 2.x 768 and v-models); "
                      "default: detected from the file")
    pred.add_argument("--epsilon", dest="v_prediction", action="store_const", const=False,
                      help="the model predicts noise (SD 1.x, SD 2.x base 512)")
    add_settings_options(p, CreateModelSettings)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.set_defaults(run=_run_create_model)
    return p


def _run_create_model(args: argparse.Namespace) -> int:
    try:
        report = convert_single_file(args.file, args.out_dir, v_prediction=args.v_prediction,
                                     fp16=args.fp16, ema=args.ema, overwrite=args.overwrite)
    except ModelFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Created {report}")
    for note in report.notes:
        print(f"note: {note}")
    return 0


def add_export(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``export MODEL_DIR OUT_FILE [--no-fp16] [--ema] [--overwrite]``."""
    p = subparsers.add_parser(
        "export", help="write a trained diffusers folder as one .safetensors/.ckpt file",
        description="Export a diffusers folder as one checkpoint in the original layout, for "
                    "AUTOMATIC1111, ComfyUI and other tools. The suffix of OUT_FILE picks the "
                    "format: .safetensors (recommended) or .ckpt.")
    p.add_argument("model_dir", type=Path, help="the diffusers folder (e.g. <model>/model)")
    p.add_argument("out_file", type=Path, help="the file to write (.safetensors or .ckpt)")
    add_settings_options(p, ExportSettings)
    p.add_argument("--overwrite", action="store_true", help="replace OUT_FILE if it exists")
    p.add_argument("--model-card", action="store_true", help="also write a Hub-ready README.md "
                   "(model card) next to OUT_FILE")
    p.add_argument("--grid", type=Path, help="a sample grid image to show in the model card")
    p.set_defaults(run=_run_export)
    return p


def _run_export(args: argparse.Namespace) -> int:
    try:
        report = export_single_file(args.model_dir, args.out_file, fp16=args.fp16, ema=args.ema,
                                    overwrite=args.overwrite)
    except ModelFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Wrote {report}")
    if args.model_card:
        card = write_model_card(args.model_dir, args.out_file.parent / "README.md", grid=args.grid)
        print(f"Wrote the model card {card}")
    return 0


def add_dehydrate_rehydrate(subparsers: Any) -> None:
    """Register ``dehydrate`` and ``rehydrate`` on the ``colab-dreambooth`` command line."""
    p = subparsers.add_parser(
        "dehydrate", help="store a trained model as its difference from the base (one file)",
        description="Write a trained diffusers folder as one .safetensors file that holds only "
                    "what differs from its base model. Lossless by default; --rank stores the "
                    "changes as low-rank factors (much smaller, approximate).")
    p.add_argument("model_dir", type=Path, help="the trained diffusers folder "
                   "(<models root>/dreambooth/<name>/model)")
    p.add_argument("base", help="the base model it was trained from: diffusers folder, "
                   ".safetensors/.ckpt, Hub id, or 'tiny'")
    p.add_argument("out_file", type=Path, help="the .safetensors file to write")
    add_settings_options(p, DehydrateSettings, rank=dict(
        nargs="?", const=DEFAULT_RANK, metavar="R",
        help=f"compact low-rank mode with rank R (R = {DEFAULT_RANK} when left out: a full SD "
             "1.5 model stays under 1 GB); higher R, smaller error, bigger file. Without --rank "
             "the file is lossless."))
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_FILE")
    p.set_defaults(run=_run_dehydrate)

    p = subparsers.add_parser(
        "rehydrate", help="rebuild a trained model from a dehydrated file and its base",
        description="Rebuild the trained diffusers folder from a file written by 'dehydrate' "
                    "and the same base model.")
    p.add_argument("file", type=Path, help="the dehydrated .safetensors file")
    p.add_argument("base", help="the same base model it was dehydrated against")
    p.add_argument("out_dir", type=Path, help="the diffusers folder to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty OUT_DIR")
    p.set_defaults(run=_run_rehydrate)


def _run_dehydrate(args: argparse.Namespace) -> int:
    try:
        result = dehydrate(args.model_dir, args.base, args.out_file, rank=args.rank,
                           overwrite=args.overwrite)
    except (DehydrateError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


def _run_rehydrate(args: argparse.Namespace) -> int:
    try:
        result = rehydrate(args.file, args.base, args.out_dir, overwrite=args.overwrite)
    except (DehydrateError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0
