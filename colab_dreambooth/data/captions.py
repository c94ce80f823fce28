"""An image's caption: its same-name ``.txt`` file, else its file name.

The one place captions are read: training's ``[filewords]`` prompts, the sample and class-image
prompts and the notebooks' captioned grids all read them here, so each sees the caption that
training sees.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from colab_dreambooth.config.prompts import PromptError
from colab_dreambooth.data.images import check_images

CAPTION_SUFFIXES = (".txt", ".TXT")  # Windows tools often write upper-case extensions
# WebUI output names look like "00012-1234-prompt": index, seed, then the prompt.
_WEBUI_PREFIX = re.compile(r"^\d+(?:-\d+)*-")
# "woman_003", "woman-12", "woman.3", "woman (2)": numbering added by cameras, OSes, tools.
_NUMBER_SUFFIX = re.compile(r"(?:[\s_.\-]+\d+|\s*\(\d+\))$")
_NUMBERS_ONLY = re.compile(r"[\d\s_.\-()]*")
_PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Caption:
    """One image's caption and the file it came from."""

    text: str
    source: Path  # the .txt it was read from, else the image (its name gave the caption)


def caption_from_filename(path: _PathLike) -> str:
    """The caption that an image's file name gives when it has no ``.txt`` caption.

    Drops the extension, WebUI ``index-seed-`` prefixes and numbering suffixes, turns ``_``
    into spaces: ``00012-1234-a photo of x.png`` -> ``a photo of x``, ``woman_003.jpg`` ->
    ``woman``. A name made only of numbers gives ``""``.
    """
    name = _WEBUI_PREFIX.sub("", Path(path).stem)
    while True:  # repeated: "woman_003 (2)" carries two numberings
        stripped = _NUMBER_SUFFIX.sub("", name)
        if stripped == name or not stripped.strip(" _.-"):
            break
        name = stripped
    if _NUMBERS_ONLY.fullmatch(name):
        return ""
    return " ".join(name.replace("_", " ").split())


def caption_file_of(image_path: _PathLike) -> Path | None:
    """The image's caption file (``.txt`` or ``.TXT``), or None when it has none."""
    image = Path(image_path)
    return next((image.with_suffix(s) for s in CAPTION_SUFFIXES
                 if image.with_suffix(s).is_file()), None)


def image_caption(image_path: _PathLike, *, concept: str | None = None) -> Caption:
    """The caption of one image: its same-stem ``.txt`` file, else its file name.

    The text file is read as UTF-8 (a BOM is dropped), newlines become spaces and whitespace
    is trimmed. An empty or blank ``.txt`` falls back to the file name, as if it were absent:
    an empty caption would leave ``[filewords]`` with nothing to build on. ``concept`` only
    names the culprit in errors. Raises PromptError when the ``.txt`` is not valid UTF-8.
    """
    image = Path(image_path)
    caption_file = caption_file_of(image)
    if caption_file is None:
        return Caption(caption_from_filename(image), image)
    try:
        text = caption_file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        message = (
            f"the caption is not valid UTF-8 (bad byte at position {exc.start}). "
            "Open it in a text editor and save it with UTF-8 encoding."
        )
        raise PromptError(message, concept=concept, caption_file=caption_file) from None
    return Caption(" ".join(text.split()) or caption_from_filename(image), caption_file)


def read_caption(image_path: _PathLike, *, concept: str | None = None) -> str:
    """The caption text of one image (see :func:`image_caption`)."""
    return image_caption(image_path, concept=concept).text


def folder_captions(folder: _PathLike, resolution: int, *,
                    concept: str | None = None) -> list[Caption]:
    """The caption of each image of ``folder`` that training can use at ``resolution`` (as
    :func:`~colab_dreambooth.data.images.check_images` finds them), in its order; ``[]`` when
    none is usable. Raises PromptError for a caption file that is not UTF-8."""
    images, _ = check_images(Path(folder).expanduser(), resolution)
    return [image_caption(path, concept=concept) for path in images]


__all__ = ["CAPTION_SUFFIXES", "Caption", "caption_file_of", "caption_from_filename",
           "folder_captions", "image_caption", "read_caption"]
