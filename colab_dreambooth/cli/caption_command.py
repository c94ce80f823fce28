"""``colab-dreambooth caption FOLDER``: write a caption ``.txt`` beside each image lacking one
(:mod:`colab_dreambooth.data.captioning`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from colab_dreambooth.config.params import load_params, resolve_concepts
from colab_dreambooth.config.prompts import EXISTING_PROMPT_CONTENTS
from colab_dreambooth.data.captioners import DEFAULT_CAPTION_MODEL, DEFAULT_TAGGER, load_captioner
from colab_dreambooth.data.captioning import (
    KEPT,
    WRITTEN,
    CaptionError,
    CaptionTokens,
    filewords_note,
    place_tokens,
    write_captions,
)


def add_caption(subparsers) -> argparse.ArgumentParser:
    """Register ``colab-dreambooth caption FOLDER [--model ID] [--tagger] [--overwrite] ...``."""
    p = subparsers.add_parser(
        "caption", help="write a caption .txt beside each image that has none (BLIP or a "
                        "WD14 tagger)",
        description="Caption the images of FOLDER that have no .txt caption yet, with a "
                    "captioning model (sentences) or a WD14 tagger (booru tags), placing the "
                    "instance token and class word as Existing Prompt Contents says the "
                    "captions hold them. Existing captions are kept unless --overwrite.")
    p.add_argument("folder", metavar="FOLDER", nargs="?", type=Path, default=None,
                   help="the images' folder (default with --params: the concept's instance "
                        "folder)")
    p.add_argument("--model", default=None, metavar="tiny|HUB_ID|PATH",
                   help=f"the captioner: a Hub id, a local folder, or 'tiny' (offline test "
                        f"model); default {DEFAULT_CAPTION_MODEL}, or {DEFAULT_TAGGER} with "
                        "--tagger")
    p.add_argument("--tagger", action="store_true", default=None,
                   help="write booru-style tags with a WD14 tagger (needs timm) instead of "
                        "sentences (guessed from --model when it names a tagger)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing captions too (default: keep them)")
    p.add_argument("--params", type=Path, default=None, metavar="FILE",
                   help="parameters JSON to take the concept's folder and tokens from")
    p.add_argument("--concept", type=int, default=1, metavar="N",
                   help="which concept of --params (from 1; default 1)")
    p.add_argument("--instance-token", default=None, help="the rare word, e.g. sks")
    p.add_argument("--class-token", default=None, help="the class word(s), e.g. 'dog'")
    p.add_argument("--existing-prompt-contents", default=None, metavar="MODE",
                   choices=EXISTING_PROMPT_CONTENTS,
                   help="what the captions must hold: " + "; ".join(
                       f"'{m}'" for m in EXISTING_PROMPT_CONTENTS) + " (default: Description, "
                       "or the concept's)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    p.add_argument("--device", default=None, help="cuda, cpu... (default: the GPU if any)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=_run_caption)
    return p


def _run_caption(args: argparse.Namespace) -> int:
    folder, tokens, note = args.folder, CaptionTokens(), ""
    if args.params is not None:
        concepts = resolve_concepts(load_params(args.params)).concepts_list
        if not 1 <= args.concept <= len(concepts):
            raise CaptionError(f"--concept {args.concept}: {args.params} has {len(concepts)} "
                               "concept(s), numbered from 1")
        concept = concepts[args.concept - 1]
        tokens, note = CaptionTokens.of(concept), filewords_note(concept)
        if folder is None:
            folder = Path(concept.instance_data_dir)
    if folder is None:
        raise CaptionError("give the images' FOLDER, or --params FILE to caption a concept's "
                           "instance folder")
    tokens = CaptionTokens(
        tokens.instance_token if args.instance_token is None else args.instance_token,
        tokens.class_token if args.class_token is None else args.class_token,
        tokens.file_prompt_contents if args.existing_prompt_contents is None
        else args.existing_prompt_contents)
    if args.batch_size < 1:
        raise CaptionError("--batch-size must be at least 1")
    place_tokens("", tokens)  # a token the setting needs and lacks: said before any loading
    if not folder.expanduser().is_dir():
        raise CaptionError(f"the image folder {folder} does not exist")
    captioner = load_captioner(args.model, tagger=args.tagger, device=args.device)
    report = write_captions(folder, captioner, tokens=tokens, overwrite=args.overwrite,
                            batch_size=args.batch_size, progress=not args.no_progress)
    print(report)
    if not report.rows:
        print("No image in the folder (jpg, jpeg, png, webp, bmp).")
    elif report.of(KEPT) and not report.of(WRITTEN):
        print("Every image already had a caption: --overwrite replaces them.")
    if note:
        print(note)
    return 0
