"""What differs between ipywidgets 7 (Google Colab's, 7.7.1) and 8 (Kaggle's, local Jupyter).

Every widget here goes through these helpers where the two disagree:

- tab and accordion titles: ``set_title(i, text)`` on 7, the ``titles`` tuple on 8 (7 silently
  ignores a ``titles=`` argument, leaving every page untitled);
- help on hover: ``description_tooltip`` on 7's labelled widgets (``tooltip`` only on 7's
  buttons), ``tooltip`` on everything in 8;
- the upload box's value: ``{name: {"metadata": {...}, "content": bytes}}`` on 7, a tuple of
  ``{"name", "type", "size", "content", ...}`` dicts on 8.
"""

from __future__ import annotations

import html
import re
from typing import Any, Sequence

import ipywidgets as w

IPYWIDGETS_MAJOR = int(w.__version__.split(".")[0])


def set_titles(container: w.Widget, titles: Sequence[str]) -> None:
    """Give a Tab's or an Accordion's pages these titles (one per child)."""
    titles = tuple(titles)
    if IPYWIDGETS_MAJOR >= 8:
        container.titles = titles
        return
    # 7 keeps a {index: title} dict: rebuild it so titles of removed pages go too.
    container._titles = {str(i): t for i, t in enumerate(titles)}


def titles_of(container: w.Widget) -> tuple[str, ...]:
    """The titles a Tab or an Accordion shows now, one per child ('' where none)."""
    if IPYWIDGETS_MAJOR >= 8:
        return tuple(t or "" for t in container.titles)
    return tuple(container.get_title(i) or "" for i in range(len(container.children)))


def set_help(widget: w.Widget, text: str) -> w.Widget:
    """Show ``text`` when the pointer rests on the widget's label; returns the widget.

    Call it after setting the description. 8's text, number, dropdown and checkbox views show
    ``tooltip`` only on widgets without a description, so there the label itself carries the
    help, as an HTML description with a ``title`` (:func:`label_of` reads the plain label).
    """
    for name in ("tooltip", "description_tooltip"):  # 8: tooltip; 7: either, by widget kind
        if widget.has_trait(name):
            setattr(widget, name, text)
            break
    else:
        raise TypeError(f"{type(widget).__name__} has no tooltip in ipywidgets {w.__version__}")
    if IPYWIDGETS_MAJOR >= 8 and widget.has_trait("description_allow_html") \
            and widget.description and not isinstance(widget, w.Button):
        label = html.escape(label_of(widget))
        widget.description = f'<span title="{html.escape(text, quote=True)}">{label}</span>'
        widget.description_allow_html = True
    return widget


def label_of(widget: w.Widget) -> str:
    """A widget's description as the user reads it (without :func:`set_help`'s markup)."""
    text = widget.description
    if getattr(widget, "description_allow_html", False):
        text = html.unescape(re.sub(r"<[^>]*>", "", text))
    return text


def help_of(widget: w.Widget) -> str | None:
    """The hover help set by :func:`set_help`."""
    for name in ("tooltip", "description_tooltip"):
        if widget.has_trait(name):
            return getattr(widget, name)
    return None


def uploaded_files(value: Any) -> list[dict[str, Any]]:
    """A FileUpload value as ``[{"name": ..., "content": bytes}, ...]`` on either version."""
    if isinstance(value, dict):  # ipywidgets 7
        return [{"name": name, "content": bytes(item["content"])} for name, item in value.items()]
    return [{"name": item["name"], "content": bytes(item["content"])} for item in value or ()]


def clear_upload(upload: w.FileUpload) -> None:
    """Forget the uploaded files (the kernel's copy of their bytes)."""
    if IPYWIDGETS_MAJOR >= 8:
        upload.value = ()
    else:  # 7's value is read-only, rebuilt from these whenever the counter changes
        upload.metadata, upload.data = [], []
        upload._counter = 0
        upload.set_trait("value", {})

