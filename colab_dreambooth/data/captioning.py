"""Automatic captions: write a ``.txt`` beside each image that has none.

The text comes from a captioner of :mod:`colab_dreambooth.data.captioners` (BLIP sentences, WD14
tags, or ``tiny`` offline). The concept's instance token and class word are placed in each
caption as its Existing Prompt Contents says the captions hold them (:func:`place_tokens`), so
the ``[filewords]`` prompt builder (:mod:`colab_dreambooth.config.prompts`) then makes valid
training prompts. An existing caption (``.txt`` or ``.TXT``, as
:mod:`colab_dreambooth.data.captions` reads them) is never replaced unless asked, and the
images are only read. An image that cannot be read is named in the report and skipped: the
others still get their captions.

Example::

    from colab_dreambooth.data.captioners import load_captioner

    report = write_captions("data/instance", load_captioner("tiny"),
                            tokens=CaptionTokens("sks", "dog", "Instance Token + Description"))
    print(report)
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from colab_dreambooth.config.prompts import (
    CLASS_DESCRIPTION,
    DESCRIPTION,
    EXISTING_PROMPT_CONTENTS,
    FILEWORDS,
    INSTANCE_CLASS_DESCRIPTION,
    INSTANCE_DESCRIPTION,
    PromptError,
    contains_token,
    tidy_prompt,
)
from colab_dreambooth.data.captioners import CAPTION, TAGS, Captioner
from colab_dreambooth.data.captions import caption_file_of, caption_from_filename, read_caption
from colab_dreambooth.data.images import load_image
from colab_dreambooth.errors import UserError
from colab_dreambooth.files import list_image_files, write_text_atomic

log = logging.getLogger(__name__)

# Images are shrunk to this longest side before captioning: every model reads 384-448 pixels,
# and a batch of full-size photos would otherwise hold hundreds of megabytes.
MAX_SIDE = 1024
_ARTICLE = re.compile(r"^(?:a|an|the)\s+", re.IGNORECASE)
_PathLike = str | os.PathLike[str]


class CaptionError(UserError, ValueError):
    """Captions cannot be written as asked (a missing folder, a token the setting needs)."""


# ----------------------------------------------------------------------------- the tokens
@dataclass(frozen=True)
class CaptionTokens:
    """What a concept's captions must hold: its instance token, class token(s) and Existing
    Prompt Contents (the extension's four values; blank = "Description")."""

    instance_token: str = ""
    class_token: str = ""
    file_prompt_contents: str = DESCRIPTION

    @classmethod
    def of(cls, concept: Any) -> CaptionTokens:
        """The tokens of a :class:`~colab_dreambooth.config.concept.Concept`."""
        return cls(concept.instance_token, concept.class_token, concept.file_prompt_contents)

    def mode(self) -> str:
        """The Existing Prompt Contents value, matched ignoring case and spacing."""
        wanted = " ".join((self.file_prompt_contents or "").split()).lower()
        for mode in EXISTING_PROMPT_CONTENTS:
            if mode.lower() == (wanted or DESCRIPTION.lower()):
                return mode
        valid = ", ".join(f"'{m}'" for m in EXISTING_PROMPT_CONTENTS)
        raise CaptionError(f"unknown Existing Prompt Contents '{self.file_prompt_contents}'. "
                           f"Use one of: {valid}.")


def filewords_note(concept: Any) -> str:
    """A note when the concept's prompts hold no ``[filewords]``: training then reads no
    caption (kohya's scripts always do); ``""`` otherwise."""
    if any(FILEWORDS.search(p or "") for p in (concept.instance_prompt, concept.class_prompt)):
        return ""
    return ("Note: the concept's instance prompt holds no [filewords], so training does not "
            "read these captions; put [filewords] in it (e.g. '[filewords]') to train with them.")


def _class_phrases(class_token: str) -> list[str]:
    """The class-token phrases in the user's order ("a woman, woman" -> both)."""
    return [" ".join(p.split()) for p in (class_token or "").split(",") if p.strip()]


def place_tokens(text: str, tokens: CaptionTokens | None, kind: str = CAPTION) -> str:
    """``text`` (a generated caption or tags) with the instance token and class word placed as
    ``tokens.file_prompt_contents`` says the captions hold them.

    - "Description" and "Class Token + Description": a caption holding no class-token phrase
      gets the class word in front (``dog, a man on a bench``), since the ``[filewords]``
      builder puts the instance token before a class word and fails without one.
    - "Instance Token + Description": the instance token goes before the first class word of
      the caption ("a photo of a dog" -> "a photo of sks dog"), else in front (``sks, ...``).
    - "Instance Token + Class Token + Description": as above, with ``sks dog, `` in front when
      the caption holds no class word.

    Tags (``kind`` "tags") get the tokens the setting names as their first tags
    (``sks, dog, 1girl, ...``; "Instance Token + Description": ``sks, 1girl, ...``), a tag equal
    to the class word moved there rather than repeated, so that kohya's ``keep_tokens`` keeps
    them in place. ``tokens`` None (or blank) leaves ``text`` as it is.
    """
    text = tidy_prompt(text)
    if tokens is None:
        return text
    mode = tokens.mode()
    token = " ".join((tokens.instance_token or "").split())
    phrases = _class_phrases(tokens.class_token)
    word = _ARTICLE.sub("", phrases[0]) if phrases else ""
    wants_token = mode in (INSTANCE_DESCRIPTION, INSTANCE_CLASS_DESCRIPTION)
    if wants_token and not token:
        raise CaptionError(f"Existing Prompt Contents is '{mode}', so the captions must hold "
                           "the Instance Token: set it (the rare word alone, e.g. 'sks').")
    wants_word = mode in (DESCRIPTION, CLASS_DESCRIPTION, INSTANCE_CLASS_DESCRIPTION)
    if kind == TAGS:
        # "Instance Token + Description" tags get no class word: the [filewords] builder
        # puts it right after the token, and one already there would then be doubled.
        return _place_tag_tokens(text, token if wants_token else "",
                                 word if wants_word else "", phrases)
    has_class = any(contains_token(text, p) for p in phrases)
    if wants_token and contains_token(text, token):
        return text
    if wants_token and has_class:
        return _insert_before_class_word(text, token, phrases)
    front = [token] if wants_token else []
    if wants_word and word and not has_class:
        front.append(word)
    return tidy_prompt(f"{' '.join(front)}, {text}") if front else text


def _place_tag_tokens(text: str, token: str, word: str, phrases: list[str]) -> str:
    """``token`` and ``word`` (either may be blank) as the first tags; the tags equal to them
    or to another class-token phrase are dropped from the rest, so none is repeated."""
    tags = [t.strip() for t in text.split(",") if t.strip()]
    dropped = ({_ARTICLE.sub("", p).lower() for p in phrases} | {p.lower() for p in phrases}
               | {token.lower()})
    front = [t for t in (token, word) if t]
    return ", ".join(front + [t for t in tags if t.lower() not in dropped])


def _insert_before_class_word(text: str, token: str, phrases: list[str]) -> str:
    """``token`` before the first class-token phrase, its article dropped ("a photo of a dog"
    -> "a photo of sks dog"), as the extension inserts it in "Description" captions."""
    alternatives = "|".join(re.escape(p).replace(r"\ ", r"\s+")
                            for p in sorted(phrases, key=len, reverse=True))
    match = re.search(rf"(?:(?<!\w)(?:a|an|the)\s+)?(?<!\w)(?P<phrase>{alternatives})(?!\w)",
                      text, re.IGNORECASE)
    if match is None:
        return f"{token}, {text}"
    phrase = _ARTICLE.sub("", match.group("phrase"))
    return tidy_prompt(f"{text[:match.start()]}{token} {phrase}{text[match.end():]}")


# ----------------------------------------------------------------------------- the folder
WRITTEN, KEPT, FAILED = "written", "kept", "failed"
MISSING = "missing"  # no caption file yet (only in :func:`current_captions`)


@dataclass
class CaptionRow:
    """One image and what happened to its caption."""

    image: Path
    caption: str  # the caption written, or the one kept ("" when the image failed)
    status: str  # WRITTEN, KEPT or FAILED (MISSING: listed by current_captions)
    note: str = ""  # why kept or failed; a fallback used


@dataclass
class CaptionReport:
    """What :func:`write_captions` did, one row per image of the folder."""

    folder: Path
    model: str
    rows: list[CaptionRow] = field(default_factory=list)

    def of(self, status: str) -> list[CaptionRow]:
        """The rows with this status."""
        return [r for r in self.rows if r.status == status]

    def summary(self) -> str:
        """One line: how many captions were written, kept and failed."""
        line = (f"{len(self.of(WRITTEN))} caption(s) written, {len(self.of(KEPT))} kept, "
                f"{len(self.of(FAILED))} image(s) unreadable in {self.folder} ({self.model})")
        return line

    def table(self, caption_chars: int = 70) -> str:
        """image -> caption [status: note], one line each, for a terminal; long captions are
        shortened to ``caption_chars`` (the files hold them whole)."""
        name_width = min(max((len(r.image.name) for r in self.rows), default=5), 40)
        lines = []
        for row in self.rows:
            text = row.caption
            if len(text) > caption_chars:
                text = text[:caption_chars - 3].rstrip() + "..."
            status = f"[{row.status}{': ' + row.note if row.note else ''}]"
            lines.append(f"{row.image.name:<{name_width}}  {text + '  ' if text else ''}{status}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"{self.table()}\n{self.summary()}" if self.rows else self.summary()


def _read_for_captioning(path: Path) -> Image.Image:
    image = load_image(path)
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    return image


def _kept_caption(image: Path) -> tuple[str, str]:
    try:
        text = read_caption(image)
    except PromptError:
        return "", "caption file is not UTF-8"
    source = caption_file_of(image)
    if source is not None and not source.read_text(encoding="utf-8", errors="replace").strip():
        return text, "caption file is blank: training uses the file name"
    return text, "has a caption"


def write_captions(folder: _PathLike, captioner: Captioner, *,
                   tokens: CaptionTokens | None = None, overwrite: bool = False,
                   batch_size: int = 8, progress: bool = True) -> CaptionReport:
    """Write a caption ``.txt`` beside each image of ``folder`` that has none.

    An image with a caption file (``.txt`` or ``.TXT``, even a blank one) keeps it untouched
    unless ``overwrite``, which replaces that same file. Each caption is ``captioner``'s text
    with the tokens placed (:func:`place_tokens`), written atomically as soon as its batch is
    done, so an interrupted run keeps what it wrote. Images are only read. An image that
    cannot be read is a FAILED row naming the error, and the others carry on; a caption the
    model left empty becomes the file-name caption (or "a picture"), noted in its row.

    Raises CaptionError when the folder does not exist or the tokens cannot be placed.
    """
    from tqdm.auto import tqdm

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CaptionError(f"the image folder {folder} does not exist")
    if tokens is not None:
        place_tokens("", tokens)  # a missing token is an error before any model runs
    rows: dict[Path, CaptionRow] = {}
    todo: list[Path] = []
    for image in list_image_files(folder):
        if caption_file_of(image) is not None and not overwrite:
            text, note = _kept_caption(image)
            rows[image] = CaptionRow(image, text, KEPT, note)
        else:
            rows[image] = CaptionRow(image, "", WRITTEN)
            todo.append(image)
    with tqdm(total=len(todo), desc="Captions", unit="image", disable=not progress) as bar:
        for start in range(0, len(todo), max(batch_size, 1)):
            batch = todo[start:start + max(batch_size, 1)]
            images, readable = [], []
            for path in batch:
                try:
                    images.append(_read_for_captioning(path))
                    readable.append(path)
                except Exception as exc:  # any decoder error: name the file, caption the rest
                    rows[path] = CaptionRow(path, "", FAILED, f"unreadable image "
                                            f"({type(exc).__name__}: {exc})")
            texts = captioner.caption(images) if images else []
            for path, text in zip(readable, texts):
                rows[path] = _write_one(path, text, captioner.kind, tokens, overwrite)
            bar.update(len(batch))
    report = CaptionReport(folder, captioner.name, list(rows.values()))
    log.debug(report.summary())
    return report


def _write_one(image: Path, text: str, kind: str, tokens: CaptionTokens | None,
               overwrite: bool) -> CaptionRow:
    note = ""
    if not tidy_prompt(text):
        text = caption_from_filename(image) or "a picture"
        note = f"the model generated nothing: used '{text}'"
    caption = place_tokens(text, tokens, kind)
    target = caption_file_of(image)
    if target is not None and not overwrite:  # written meanwhile (by the user): theirs stays
        return CaptionRow(image, read_caption(image), KEPT, "caption appeared while captioning")
    write_text_atomic(target or image.with_suffix(".txt"), caption + "\n")
    return CaptionRow(image, caption, WRITTEN, note)


def current_captions(folder: _PathLike) -> CaptionReport:
    """The captions the images of ``folder`` have now, without a model: a KEPT row per
    captioned image, a MISSING row (caption ``""``) per image without one, to edit by hand."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CaptionError(f"the image folder {folder} does not exist")
    rows = []
    for image in list_image_files(folder):
        if caption_file_of(image) is None:
            rows.append(CaptionRow(image, "", MISSING, "no caption yet"))
        else:
            text, note = _kept_caption(image)
            rows.append(CaptionRow(image, text, KEPT, note))
    return CaptionReport(folder, "(none)", rows)


def save_edited_captions(edits: Iterable[tuple[_PathLike, str]]) -> list[Path]:
    """Write edited captions (image, text): each to the image's caption file (``.txt`` when
    it has none), atomically; blank texts are skipped. Returns the files written."""
    written = []
    for image, text in edits:
        text = " ".join(str(text).split())
        if not text:
            continue
        target = caption_file_of(image) or Path(image).with_suffix(".txt")
        write_text_atomic(target, text + "\n")
        written.append(target)
    return written


__all__ = ["MAX_SIDE", "WRITTEN", "KEPT", "FAILED", "MISSING", "CaptionError", "CaptionReport",
           "CaptionRow", "CaptionTokens", "current_captions", "filewords_note", "place_tokens", "save_edited_captions", "write_captions"]
