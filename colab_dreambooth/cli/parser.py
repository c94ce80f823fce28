"""``colab-dreambooth`` (also ``python -m colab_dreambooth``): the parser of every command, and
how a command's outcome becomes an exit code and one ``error:`` line."""

from __future__ import annotations

import argparse
import errno
import sys
from typing import Sequence

from colab_dreambooth.cli.caption_command import add_caption
from colab_dreambooth.cli.exit_codes import EXIT_ERROR, EXIT_OK, EXIT_STOPPED, EXIT_USAGE
from colab_dreambooth.cli.extract_command import add_extract_lora
from colab_dreambooth.cli.image_commands import add_class_images, add_model_card, add_sample
from colab_dreambooth.cli.model_commands import (
    add_create_model,
    add_dehydrate_rehydrate,
    add_export,
)
from colab_dreambooth.cli.run_commands import add_run_commands
from colab_dreambooth.console import configure_logging, hide_library_progress
from colab_dreambooth.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (``EXIT_*``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    if getattr(args, "no_progress", False):
        hide_library_progress()
    try:
        return args.run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # a file missing or unreadable, a full disk: the user's situation
        print(f"error: {_describe_os_error(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_STOPPED
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch's, on CUDA (no import here)
            print(f"error: out of GPU memory ({str(exc).splitlines()[0]}). Lower the batch "
                  "size or resolution, or turn on gradient checkpointing, 8-bit Adam or LoRA; "
                  "`colab-dreambooth env --config PARAMS` shows the estimate", file=sys.stderr)
            return EXIT_ERROR
        raise  # anything else is a bug: keep its traceback for the report


def _describe_os_error(exc: OSError) -> str:
    what = {errno.ENOENT: "not found", errno.EACCES: "permission denied",
            errno.ENOSPC: "no space left on the disk", errno.EISDIR: "is a folder, not a file",
            errno.ENOTDIR: "is not a folder"}.get(exc.errno or 0)
    if what and exc.filename:
        return f"{exc.filename}: {what}"
    return str(exc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colab-dreambooth", description=(
        "DreamBooth fine-tuning of Stable Diffusion with the AUTOMATIC1111 extension's fields."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_run_commands(sub)
    for add in (add_class_images, add_sample, add_model_card, add_create_model, add_export,
                add_dehydrate_rehydrate, add_caption, add_extract_lora):
        add(sub)
    return parser


__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_STOPPED"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
