"""``extract-lora``: a LoRA from a fully fine-tuned model, as kohya's
``extract_lora_from_models.py`` makes one (the difference from the base, by SVD)."""

from __future__ import annotations

import argparse
from pathlib import Path

from colab_dreambooth.cli.exit_codes import EXIT_OK
from colab_dreambooth.models.lora_extract import SAVE_DTYPES, extract_lora


def add_extract_lora(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``extract-lora BASE TUNED [--out FILE] [--rank 32] [--conv-rank 0] ...``."""
    p = subparsers.add_parser(
        "extract-lora", help="extract a LoRA from a fully fine-tuned model (SVD of the change)",
        description="Write the difference between a fully fine-tuned model and its base as a "
                    "LoRA file in kohya's layout (the WebUI, ComfyUI and diffusers load it), as "
                    "kohya's extract_lora_from_models.py does. BASE and TUNED: a diffusers "
                    "folder, a run's folder, a .safetensors/.ckpt file, a Hub id or 'tiny'.")
    p.add_argument("base", help="the model TUNED was fine-tuned from")
    p.add_argument("tuned", help="the fine-tuned model (e.g. models/dreambooth/<name>)")
    p.add_argument("--out", type=Path, help="the .safetensors file to write (default: beside "
                   "the tuned model, <name>_extracted_r<rank>.safetensors)")
    p.add_argument("--rank", type=_positive, default=32, metavar="R",
                   help="rank (kohya's --dim) of the Linear and 1x1 layers; alpha = rank "
                   "(default: 32)")
    p.add_argument("--conv-rank", type=_not_negative, default=0, metavar="R",
                   help="rank (kohya's --conv_dim) of the 3x3 convolutions of the ResNet, "
                   "down- and upsampling blocks (LoCon); 0 leaves them out (default: 0)")
    p.add_argument("--clamp-quantile", type=_quantile, default=0.99, metavar="Q",
                   help="clamp the factors to this quantile of their values, as kohya does "
                   "(default: 0.99; 1: no clamping)")
    p.add_argument("--min-diff", type=_not_negative_float, default=0.01, metavar="D",
                   help="leave the text encoder out unless a weight of it changed by more than "
                   "this (default: 0.01)")
    p.add_argument("--save-precision", choices=sorted(SAVE_DTYPES), default="fp16",
                   help="dtype of the saved factors (default: fp16)")
    p.add_argument("--device", help="where the SVDs run (default: cuda when available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_extract_lora)
    return p


def _run_extract_lora(args: argparse.Namespace) -> int:
    # Its errors are UserErrors: main() prints them as one "error:" line and returns 1.
    report = extract_lora(args.base, args.tuned, args.out, rank=args.rank,
                          conv_rank=args.conv_rank, clamp_quantile=args.clamp_quantile,
                          min_diff=args.min_diff, save_precision=args.save_precision,
                          overwrite=args.overwrite, device=args.device,
                          progress=not args.no_progress)
    print(report.summary())
    return EXIT_OK


def _positive(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text}")
    return value


def _not_negative(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


def _quantile(text: str) -> float:
    value = _float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {text}")
    return value


def _not_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
