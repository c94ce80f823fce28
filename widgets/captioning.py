"""Automatic captions in notebook 01: choose a captioner, run it over a concept's images, then
edit the captions in a table of thumbnails and save them.

The work is :func:`colab_dreambooth.data.captioning.write_captions`: a caption is written only
beside an image that has none unless *Overwrite* is ticked, and images are never changed. The
run happens in the button's callback, in the kernel's own thread (captioning a folder takes
seconds to minutes), so every widget change happens there, which Colab requires.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Callable

import ipywidgets as w
from PIL import Image

from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.data.captioners import (
    DEFAULT_CAPTION_MODEL,
    DEFAULT_TAGGER,
    TINY,
    Captioner,
    load_captioner,
)
from colab_dreambooth.data.captioning import (
    FAILED,
    KEPT,
    MISSING,
    CaptionError,
    CaptionReport,
    CaptionRow,
    CaptionTokens,
    current_captions,
    filewords_note,
    save_edited_captions,
    write_captions,
)
from colab_dreambooth.data.images import load_image
from colab_dreambooth.errors import UserError

from .compat import set_help
from .plot import png_bytes

SENTENCES, TAGS = "Sentences (BLIP)", "Tags (WD14 tagger, needs timm)"
# Offered in the model box; any Hub id or local folder can be typed instead.
MODEL_CHOICES = (DEFAULT_CAPTION_MODEL, "Salesforce/blip-image-captioning-base",
                 DEFAULT_TAGGER, "SmilingWolf/wd-swinv2-tagger-v3", TINY)
PREVIEW_LIMIT = 200  # rows in the table: beyond this the page gets slow; the files hold all
THUMBNAIL = 96


def thumbnail_png(path: Path, size: int = THUMBNAIL) -> bytes:
    """A small PNG of the image (a grey square when it cannot be read)."""
    try:
        image = load_image(path)
        image.thumbnail((size, size))
    except Exception:  # the row's status says why
        image = Image.new("RGB", (size, size), (200, 200, 200))
    return png_bytes(image)


class CaptionApp:
    """The captioning step: model, kind, *Overwrite*, *Write captions*, then an editable table.

    ``source`` gives, when *Write captions* is clicked, the configuration whose concept (the
    *Concept* number) names the folder and the tokens: a :class:`DreamBoothConfig`, or a
    callable returning one (``lambda: form.config``, so edits in the form count).
    """

    def __init__(self, source: DreamBoothConfig | Callable[[], DreamBoothConfig], *,
                 model: str = DEFAULT_CAPTION_MODEL) -> None:
        self._source = source
        self._captioner: Captioner | None = None
        self._loaded: tuple[str, bool | None] | None = None
        self.rows: list[CaptionRow] = []
        self.editors: list[w.Textarea] = []
        self.report: CaptionReport | None = None
        self._note = ""  # said when the concept's prompts read no caption
        self.kind = set_help(w.Dropdown(options=[SENTENCES, TAGS], value=SENTENCES,
                                        description="Write"),
                             "Sentences like 'a dog sitting on the grass' (BLIP), or booru tags "
                             "like '1girl, solo, long hair' for Shuffle Tags (WD14 tagger)")
        self.model = set_help(w.Combobox(value=model, options=list(MODEL_CHOICES),
                                         description="Model", ensure_option=False,
                                         layout=w.Layout(width="480px")),
                              "A Hub id, a local folder, or 'tiny' (an offline test model "
                              "writing nonsense words)")
        self.overwrite = set_help(w.Checkbox(value=False, description="Overwrite captions"),
                                  "Also replace the captions images already have (off: they "
                                  "are kept)")
        self.concept = set_help(w.BoundedIntText(value=1, min=1, max=99, description="Concept",
                                                 layout=w.Layout(width="160px")),
                                "Which concept's instance images to caption")
        self.run_button = w.Button(description="Write captions", button_style="primary",
                                   icon="pencil")
        self.save_button = w.Button(description="Save edited captions", icon="save",
                                    disabled=True)
        self.edit_button = set_help(w.Button(description="Edit current captions", icon="edit"),
                                    "Show the captions the images have now, to edit by hand "
                                    "(no model runs)")
        self.status = w.HTML()
        self.progress = w.Output()
        self.table = w.VBox()
        self.kind.observe(self._kind_changed, names="value")
        self.run_button.on_click(lambda _: self.run())
        self.save_button.on_click(lambda _: self.save())
        self.edit_button.on_click(lambda _: self.show_current())
        self.widget = w.VBox([
            w.HBox([self.concept, self.kind]), self.model, self.overwrite,
            w.HBox([self.run_button, self.edit_button, self.save_button]), self.status, self.progress, self.table])

    @classmethod
    def for_form(cls, form: Any, **kwargs: Any) -> CaptionApp:
        """The step reading ``form.config`` (a :class:`widgets.form.ConfigForm`) at each run."""
        return cls(lambda: form.config, **kwargs)

    def _kind_changed(self, change: dict) -> None:
        defaults = {SENTENCES: DEFAULT_CAPTION_MODEL, TAGS: DEFAULT_TAGGER}
        if self.model.value in defaults.values() or not self.model.value.strip():
            self.model.value = defaults[change["new"]]

    def _config(self) -> DreamBoothConfig:
        return self._source() if callable(self._source) else self._source

    def _say(self, text: str, colour: str = "#2e7d32") -> None:
        body = html.escape(text).replace("\n", "<br>")
        self.status.value = f"<span style='color:{colour}'>{body}</span>"

    def _concept(self) -> tuple[Path, CaptionTokens]:
        """The chosen concept's instance folder and tokens; raises UserError saying what is
        wrong."""
        concepts = self._config().concepts_list
        if not 1 <= self.concept.value <= len(concepts):
            raise UserError(f"there are {len(concepts)} concept(s): choose one of them")
        concept = concepts[self.concept.value - 1]
        folder = Path(concept.instance_data_dir).expanduser()
        if not folder.is_dir():  # said before a model is downloaded for nothing
            raise CaptionError(f"the image folder {folder} does not exist: upload the "
                               "images first (or fix the concept's folder)")
        self._note = filewords_note(concept)
        return folder, CaptionTokens.of(concept)

    def show_current(self) -> CaptionReport | None:
        """Show the chosen concept's captions as they are now, to edit (no model runs)."""
        try:
            report = current_captions(self._concept()[0])
        except (UserError, OSError) as exc:
            self._say(str(exc), "#c62828")
            return None
        missing = len(report.of(MISSING))
        self.show(report, f"{len(report.rows)} image(s), {missing} without a caption. Edit "
                          "below, then Save edited captions.")
        return report

    def run(self) -> CaptionReport | None:
        """Caption the chosen concept's images lacking a caption; show the table. Returns the
        report (None when a problem, shown in the status line, stopped it)."""
        self.run_button.disabled = True
        try:
            folder, tokens = self._concept()
            self._say(f"Loading {self.model.value.strip() or 'the model'}...", "#555")
            # Sentences: a model named like a tagger is still run as one (None guesses).
            captioner = self._load(self.model.value.strip(), self.kind.value == TAGS or None)
            self._say(f"Captioning {folder}...", "#555")
            self.progress.clear_output()
            with self.progress:  # tqdm.auto draws its bar here
                report = write_captions(folder, captioner, tokens=tokens,
                                        overwrite=self.overwrite.value)
        except (UserError, OSError) as exc:  # a model that failed to load, a full disk...
            self._say(str(exc), "#c62828")
            return None
        finally:
            self.run_button.disabled = False
        self.show(report)
        return report

    def _load(self, model: str, tagger: bool | None) -> Captioner:
        """The captioner, loaded once per (model, kind)."""
        if self._captioner is None or self._loaded != (model, tagger):
            self._captioner = load_captioner(model or None, tagger=tagger)
            self._loaded = (model, tagger)
        return self._captioner

    def show(self, report: CaptionReport, message: str | None = None) -> None:
        """Fill the table: thumbnail, editable caption and status of each image; ``message``
        for the status line (default: what the run did)."""
        self.report = report
        self.rows = [r for r in report.rows if r.status != FAILED][:PREVIEW_LIMIT]
        self.editors = [w.Textarea(value=r.caption, layout=w.Layout(width="520px",
                                                                    height="64px"))
                        for r in self.rows]
        lines = []
        for row, editor in zip(self.rows, self.editors):
            note = f"{row.status}{': ' + row.note if row.note else ''}"
            label = w.HTML(f"<small><code>{html.escape(row.image.name)}</code><br>"
                           f"{html.escape(note)}</small>", layout=w.Layout(width="220px"))
            picture = w.Image(value=thumbnail_png(row.image), format="png",
                              layout=w.Layout(width=f"{THUMBNAIL}px"))
            lines.append(w.HBox([picture, editor, label]))
        lines += [w.HTML(f"<span style='color:#c62828'>{html.escape(r.image.name)}: "
                         f"{html.escape(r.note)}</span>") for r in report.of(FAILED)]
        if len(report.rows) - len(report.of(FAILED)) > PREVIEW_LIMIT:
            lines.append(w.HTML(f"<i>The first {PREVIEW_LIMIT} images are shown; every caption "
                                "was written.</i>"))
        self.table.children = lines
        self.save_button.disabled = not self.rows
        extra = ("" if self.overwrite.value or not report.of(KEPT) else
                 " Existing captions were kept (tick Overwrite to replace them).")
        note = f" {self._note}" if self._note else ""
        self._say(message or (report.summary() + "." + extra
                              + " Edit below, then Save edited captions.") + note)

    def save(self) -> list[Path]:
        """Write the captions edited in the table (only those that changed)."""
        edits = [(row.image, editor.value) for row, editor in zip(self.rows, self.editors)
                 if " ".join(editor.value.split()) != row.caption]
        try:
            written = save_edited_captions(edits)
        except OSError as exc:
            self._say(f"could not save: {exc}", "#c62828")
            return []
        for row, editor in zip(self.rows, self.editors):
            if " ".join(editor.value.split()):
                row.caption = " ".join(editor.value.split())
        self._say(f"Saved {len(written)} edited caption(s).")
        return written


__all__ = ["CaptionApp", "MODEL_CHOICES", "thumbnail_png"]
