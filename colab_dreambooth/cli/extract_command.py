"""``extract-lora``: a LoRA from a fully fine-tuned model, as kohya's
``extract_lora_from_models.py`` makes one (the difference from the base, by SVD)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from colab_dreambooth.cli.exit_codes import EXIT_OK
from colab_dreambooth.cli.options import add_settings_options, settings_from_args
from colab_dreambooth.config.commands import ExtractLoraSettings
from colab_dreambooth.models.lora_extract import extract_lora


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
    add_settings_options(p, ExtractLoraSettings)
    p.add_argument("--device", help="where the SVDs run (default: cuda when available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_extract_lora)
    return p


def _run_extract_lora(args: argparse.Namespace) -> int:
    # Its errors are UserErrors: main() prints them as one "error:" line and returns 1.
    settings = settings_from_args(args, ExtractLoraSettings)
    report = extract_lora(args.base, args.tuned, args.out, **dataclasses.asdict(settings),
                          overwrite=args.overwrite, device=args.device,
                          progress=not args.no_progress)
    print(report.summary())
    return EXIT_OK
