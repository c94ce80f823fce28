"""Build training prompts from image captions (``[filewords]``), as the A1111 extension does.

"Existing Prompt Contents" says what the captions already hold, and so how the instance token
and class word are added to or removed from the caption on each side. After building, the
instance prompt holds the instance token and a class word; the class prompt never holds the
instance token. This module only works on text: captions are read from their files by
:mod:`colab_dreambooth.data.captions`.
"""

from __future__ import annotations

import os
import random
import re
from typing import Callable

from colab_dreambooth.errors import UserError

EXISTING_PROMPT_CONTENTS: tuple[str, ...] = (
    "Description",
    "Instance Token + Description",
    "Class Token + Description",
    "Instance Token + Class Token + Description",
)
DESCRIPTION, INSTANCE_DESCRIPTION, CLASS_DESCRIPTION, INSTANCE_CLASS_DESCRIPTION = (
    EXISTING_PROMPT_CONTENTS
)

FILEWORDS = re.compile(r"\[filewords\]", re.IGNORECASE)
_ARTICLE = r"(?:a|an|the)"
_LEADING_ARTICLE = re.compile(rf"^{_ARTICLE}\s+", re.IGNORECASE)
_PathLike = str | os.PathLike[str]


class PromptError(UserError, ValueError):
    """A prompt or caption that cannot give valid training prompts; names concept and file."""

    def __init__(
        self, message: str, *, concept: str | None = None, caption_file: _PathLike | None = None
    ) -> None:
        where = [f"concept '{concept}'"] if concept not in (None, "") else []
        if caption_file is not None:
            where.append(f"caption file '{os.fspath(caption_file)}'")
        prefix = "In " + ", ".join(where) + ": " if where else ""
        super().__init__(prefix + message)
        self.concept = concept
        self.caption_file = caption_file


def _phrase_pattern(phrase: str) -> str:
    """Regex for a whole-word phrase; any run of whitespace matches its inner spaces."""
    words = [re.escape(word) for word in phrase.split()]
    return r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)"


def tidy_prompt(text: str) -> str:
    """Collapse whitespace and drop the stray commas left where words were removed or
    ``[filewords]`` was filled."""
    text = " ".join(text.split())
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r",(?:\s*,)+", ",", text)
    return text.strip(" ,")


def _class_word(phrase: str) -> str:
    """The class-token phrase without its leading article ("a woman" -> "woman")."""
    return _LEADING_ARTICLE.sub("", phrase).strip() or phrase


def _listed_class_tokens(class_token: str) -> list[str]:
    """Class tokens in the order the user wrote them, tidied and without duplicates."""
    tokens: list[str] = []
    for part in (class_token or "").split(","):
        token = " ".join(part.split())
        if token and token.lower() not in (t.lower() for t in tokens):
            tokens.append(token)
    return tokens


def split_class_tokens(class_token: str) -> list[str]:
    """Split a comma-separated Class Token field, longest first, blanks and duplicates gone.

    ``"woman, a woman"`` -> ``["a woman", "woman"]``: longest first so that "a woman" is
    matched as a whole rather than "woman" inside it.
    """
    return sorted(_listed_class_tokens(class_token), key=len, reverse=True)


def contains_token(text: str, token: str) -> bool:
    """Whether ``token`` occurs in ``text`` as a whole word (or phrase), ignoring case.

    ``contains_token("a sks dog", "sks")`` is true; ``contains_token("he asks", "sks")`` is not.
    A blank token is never contained.
    """
    if not token or not token.strip():
        return False
    return re.search(_phrase_pattern(token), text or "", re.IGNORECASE) is not None


def remove_token(text: str, token: str) -> str:
    """``text`` without the whole word (or phrase) ``token``, ignoring case; spaces tidied.

    ``remove_token("a photo of sks dog, asks", "sks")`` -> ``"a photo of dog, asks"``.
    """
    if not token.split():
        return tidy_prompt(text)
    return tidy_prompt(re.sub(_phrase_pattern(token), " ", text, flags=re.IGNORECASE))


def _canonical_mode(existing_prompt_contents: str, concept: str | None) -> str:
    """The display string of a mode, matched ignoring case and spacing; blank = Description."""
    wanted = " ".join((existing_prompt_contents or "").split()).lower() or DESCRIPTION.lower()
    modes = {mode.lower(): mode for mode in EXISTING_PROMPT_CONTENTS}
    if wanted in modes:
        return modes[wanted]
    valid = ", ".join(f"'{mode}'" for mode in EXISTING_PROMPT_CONTENTS)
    message = f"unknown Existing Prompt Contents '{existing_prompt_contents}'. Use one of: {valid}."
    raise PromptError(message, concept=concept)


def build_prompts(
    caption: str,
    instance_prompt: str,
    class_prompt: str,
    instance_token: str,
    class_token: str,
    existing_prompt_contents: str,
    *,
    caption_file: _PathLike | None = None,
    concept: str | None = None,
) -> tuple[str, str]:
    """Build the (instance prompt, class prompt) used to train on one image.

    ``[filewords]`` in either prompt is replaced by ``caption``, rewritten as
    ``existing_prompt_contents`` says (blank = "Description"); the text around ``[filewords]``
    is kept as written. A blank class prompt gives ``""`` (no prior preservation).
    ``caption_file`` and ``concept`` only serve to name the culprit in errors.

    Raises PromptError for an unknown mode, a needed token left blank, an instance prompt
    without the instance token or a class word, or a class prompt holding the instance token.
    """
    mode = _canonical_mode(existing_prompt_contents, concept)
    token = " ".join((instance_token or "").split())
    listed = _listed_class_tokens(class_token)
    caption = tidy_prompt(caption or "")
    instance, klass = tidy_prompt(instance_prompt or ""), tidy_prompt(class_prompt or "")
    instance_fw, class_fw = bool(FILEWORDS.search(instance)), bool(FILEWORDS.search(klass))

    def fail(message: str) -> PromptError:
        return PromptError(message, concept=concept, caption_file=caption_file)

    # Every mode but the last rewrites the instance side around the token; the two
    # "Instance Token" modes take it out of the class side.
    needs_token = (instance_fw and mode != INSTANCE_CLASS_DESCRIPTION) or (
        class_fw and mode in (INSTANCE_DESCRIPTION, INSTANCE_CLASS_DESCRIPTION)
    )
    if needs_token and not token:
        raise fail(
            f"a prompt holds [filewords] and Existing Prompt Contents is '{mode}', so the "
            "Instance Token is needed: set the Instance Token (the rare word alone, e.g. 'sks')."
        )

    if instance_fw:
        instance = _fill_instance_prompt(instance, caption, token, listed, mode, fail)
    if class_fw:
        klass = _fill_class_prompt(klass, caption, token, listed, mode)
    if token and contains_token(klass, token):
        hint = "remove it from the class prompt"
        if class_fw and contains_token(caption, token):
            hint = "the caption holds it: choose an Existing Prompt Contents that starts with "
            hint += "'Instance Token' so that it is taken out of the class prompt"
        raise fail(f"the class prompt '{klass}' holds the Instance Token '{token}'; {hint}.")
    return instance, klass


def _fill_instance_prompt(instance: str, caption: str, token: str, listed: list[str], mode: str,
                          fail: Callable[[str], PromptError]) -> str:
    """``instance`` with ``[filewords]`` replaced by the caption, rewritten as ``mode`` says so
    that it holds the instance token and a class word; raises ``fail(...)`` when it cannot."""
    text = caption
    outside = FILEWORDS.sub(" ", instance)
    if mode in (DESCRIPTION, CLASS_DESCRIPTION):
        # Insert only if neither the template nor the caption already holds the token.
        if not contains_token(outside, token) and not contains_token(caption, token):
            inserted = _insert_instance_token(caption, token, listed)
            if inserted is None:
                where = f"none of the Class Tokens ({', '.join(listed)})" if listed else ""
                raise fail(
                    f"the caption '{caption}' holds {where or 'no class word'}, so the "
                    f"Instance Token '{token}' has no place. Add the class word to the caption"
                    f"{'' if listed else ' and set the Class Token (e.g. woman)'}, or change "
                    "Existing Prompt Contents to match what the captions hold."
                )
            text = inserted
    elif mode == INSTANCE_DESCRIPTION and listed:
        text = _add_class_word(caption, token, listed)
    instance = tidy_prompt(FILEWORDS.sub(lambda _: text, instance))
    hint = (
        f"Existing Prompt Contents is '{mode}'. Add it to the caption or to the instance "
        "prompt, or change Existing Prompt Contents to match what the captions hold."
    )
    lacks = f"the instance prompt '{instance}' lacks"
    words = list(dict.fromkeys(_class_word(t).lower() for t in listed))
    if token and not contains_token(instance, token):
        raise fail(f"{lacks} the Instance Token '{token}'. {hint}")
    if words and not any(contains_token(instance, w) for w in words):
        raise fail(f"{lacks} a class word ({'/'.join(words)}). {hint}")
    return instance


def _fill_class_prompt(klass: str, caption: str, token: str, listed: list[str], mode: str) -> str:
    """``klass`` with ``[filewords]`` replaced by the caption; the two "Instance Token" modes
    take the token out ("Instance Token + Description" puts the class word in its place
    unless one follows it already)."""
    text = caption
    if mode in (INSTANCE_DESCRIPTION, INSTANCE_CLASS_DESCRIPTION):
        word = _class_word(listed[0]) if mode == INSTANCE_DESCRIPTION and listed else ""
        text = _replace_instance_token(caption, token, word, listed)
    return tidy_prompt(FILEWORDS.sub(lambda _: text, klass))


def _insert_instance_token(caption: str, token: str, listed: list[str]) -> str | None:
    """Put the token before the first class-token phrase, dropping its article; None if none."""
    if not listed:
        return None
    alternatives = "|".join(_phrase_pattern(t) for t in split_class_tokens(",".join(listed)))
    # The optional article lets "a photo of a woman" become "a photo of sks woman" even when
    # the class token is just "woman"; the alternation order makes longer tokens win.
    pattern = re.compile(rf"(?:(?<!\w){_ARTICLE}\s+)?(?P<phrase>{alternatives})", re.IGNORECASE)
    match = pattern.search(caption)
    if match is None:
        return None
    replacement = f"{token} {_class_word(match.group('phrase'))}"
    return caption[: match.start()] + replacement + caption[match.end() :]


def _class_words_pattern(listed: list[str]) -> str:
    """Alternation of every class-token phrase and class word, longest first."""
    words = {w.lower(): w for t in listed for w in (t, _class_word(t))}
    return "|".join(_phrase_pattern(w) for w in sorted(words.values(), key=len, reverse=True))


def _add_class_word(caption: str, token: str, listed: list[str]) -> str:
    """Put the first class word right after the first instance token, unless one is there."""
    match = re.search(_phrase_pattern(token), caption, re.IGNORECASE)
    if match is None:
        return caption  # the instance-prompt check reports the missing token
    after = caption[match.end() :]
    if re.match(rf"\s+(?:{_class_words_pattern(listed)})", after, re.IGNORECASE):
        return caption
    return f"{caption[: match.end()]} {_class_word(listed[0])}{after}"


def _replace_instance_token(caption: str, token: str, word: str, listed: list[str]) -> str:
    """Replace every instance token by ``word`` (remove it when ``word`` is blank).

    A token already followed by a class word is simply removed: "sks woman" -> "woman".
    """
    token_re = _phrase_pattern(token)
    if listed:
        followed = rf"{token_re}(?=\s+(?:{_class_words_pattern(listed)}))"
        caption = re.sub(followed, "", caption, flags=re.IGNORECASE)
    return tidy_prompt(re.sub(token_re, lambda _: word, caption, flags=re.IGNORECASE))


def shuffle_tags(caption: str, keep_tokens: int, seed: int, epoch: int, index: int,
                 row: str = "") -> str:
    """``caption``'s comma-separated tags with all but the first ``keep_tokens`` in a random
    order that depends only on ``(seed, epoch, index, row)``: the same image gets the same
    order when a run is repeated or resumed, and a new order each epoch.

    Tags are stripped and re-joined with ", "; a caption with no comma is returned as it is.
    """
    tags = [t.strip() for t in caption.split(",")]
    if len(tags) < 2:
        return caption
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    # A string seed is hashed with SHA-512: the same in every process and Python version.
    random.Random(f"shuffle_tags:{seed}:{epoch}:{index}:{row}").shuffle(rest)
    return ", ".join(t for t in kept + rest if t)
