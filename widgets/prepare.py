"""Preparing the training images in a notebook: upload, look at them, see every problem.

Uploads are saved next to what is already in the folder and never replace a file; the views
(captioned grid, crop preview, data report) only read the user's files.
"""

from __future__ import annotations

import errno
import hashlib
import html
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import ipywidgets as w
from PIL import Image, ImageOps

from colab_dreambooth.config.params import resolve_concepts
from colab_dreambooth.config.prompts import PromptError
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.config.validation import validate
from colab_dreambooth.data.captions import read_caption
from colab_dreambooth.data.dataset import DataError, collect_training_data
from colab_dreambooth.data.images import crop_and_resize, load_image
from colab_dreambooth.errors import ConfigError
from colab_dreambooth.files import IMAGE_EXTENSIONS, list_image_files, temp_file_beside
from colab_dreambooth.generation.sample import image_grid
from colab_dreambooth.runtime.device import DeviceInfo

from .compat import clear_upload, set_help, uploaded_files

UPLOAD_EXTENSIONS = IMAGE_EXTENSIONS + (".txt",)
GRID_LIMIT = 24  # images shown per concept: enough to spot a bad one, small enough to send
CAPTION_CHARS = 60


# ----------------------------------------------------------------------------- uploads
@dataclass
class UploadResult:
    """What :func:`save_uploads` did with each uploaded file."""

    saved: list[Path] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)  # uploaded name -> name written
    skipped: list[str] = field(default_factory=list)  # "name: why"

    def summary(self) -> str:
        """One line per kind of outcome."""
        lines = [f"saved {len(self.saved)} file(s)"]
        lines += [f"{old} saved as {new} (a different file of that name is already there)"
                  for old, new in self.renamed.items()]
        lines += [f"skipped {s}" for s in self.skipped]
        return "\n".join(lines)


def save_uploads(files: Iterable[Mapping[str, Any]], folder: str | os.PathLike) -> UploadResult:
    """Save uploaded files (``{"name", "content"}`` as ``FileUpload.value`` gives) in ``folder``.

    Images (jpg, jpeg, png, webp, bmp) and ``.txt`` captions are accepted. A file is never
    overwritten: one identical to a file already there is skipped, a different one with a taken
    name is saved as ``name (1).png`` (its caption, uploaded with it, gets the same new stem).
    Each file is written under a temporary name first, so a failed upload leaves no half file.
    """
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    result = UploadResult()
    groups: dict[str, list[tuple[str, bytes]]] = {}
    for item in files:
        name = Path(str(item["name"]).replace("\\", "/")).name  # never a path out of folder
        content = bytes(item["content"])
        if not name or name.startswith("."):
            result.skipped.append(f"{name or '(no name)'}: hidden or empty file name")
        elif Path(name).suffix.lower() not in UPLOAD_EXTENSIONS:
            result.skipped.append(f"{name}: not a supported image ({', '.join(IMAGE_EXTENSIONS)})"
                                  " or .txt caption: convert it (e.g. HEIC to JPEG) first")
        else:
            groups.setdefault(Path(name).stem, []).append((name, content))
    for stem, members in groups.items():
        fresh = [(n, c) for n, c in members if not _same_file(folder / n, c)]
        result.skipped += [f"{n}: already in the folder" for n, c in members
                           if (n, c) not in fresh]
        new_stem = _free_stem(folder, stem, [Path(n).suffix for n, _ in fresh])
        for name, content in fresh:
            target = folder / (new_stem + Path(name).suffix)
            _write_new(target, content)
            result.saved.append(target)
            if target.name != name:
                result.renamed[name] = target.name
    return result


def _same_file(path: Path, content: bytes) -> bool:
    if not path.is_file() or path.stat().st_size != len(content):
        return False
    return hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(content).digest()


def _free_stem(folder: Path, stem: str, suffixes: list[str]) -> str:
    """``stem``, or ``stem (k)`` when any of its files would land on an existing name."""
    candidate, k = stem, 0
    while any((folder / (candidate + s)).exists() for s in suffixes):
        k += 1
        candidate = f"{stem} ({k})"  # the numbering captions from file names ignore
    return candidate


def _write_new(target: Path, content: bytes) -> None:
    """Write ``target`` atomically, failing rather than replacing a file that appeared."""
    fd, tmp = temp_file_beside(target, suffix=".upload")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, target)  # atomic and refuses an existing name
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                raise FileExistsError(f"{target} appeared while uploading: upload it again")
            if target.exists():  # a file system without hard links (some FUSE mounts)
                raise FileExistsError(f"{target} appeared while uploading: upload it again")
            os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


class UploadBox:
    """A FileUpload button that saves what is picked into ``folder`` (see :func:`save_uploads`)."""

    def __init__(self, folder: str | os.PathLike,
                 on_saved: Callable[[UploadResult], None] | None = None) -> None:
        self.folder = Path(folder).expanduser()
        self.on_saved = on_saved
        self.upload = set_help(
            w.FileUpload(accept=",".join(UPLOAD_EXTENSIONS), multiple=True,
                         description="Upload images"),
            "Images and same-name .txt captions")
        self.status = w.HTML()
        note = w.HTML(f"Uploads go to <code>{html.escape(str(self.folder))}</code>; files already "
                      "there are kept (a taken name gets ' (1)' added).")
        self.widget = w.VBox([note, self.upload, self.status])
        self.upload.observe(lambda change: self._saved(uploaded_files(change["new"])),
                            names="value")

    def _saved(self, files: list[dict[str, Any]]) -> None:
        if not files:
            return
        try:
            result = save_uploads(files, self.folder)
        except OSError as exc:
            self.status.value = f"<span style='color:#c62828'>{html.escape(str(exc))}</span>"
            return
        clear_upload(self.upload)  # the files are on disk: free the kernel's copy
        text = html.escape(result.summary()).replace("\n", "<br>")
        self.status.value = f"<span style='color:#2e7d32'>{text}</span>"
        if self.on_saved is not None:
            self.on_saved(result)


def colab_upload(folder: str | os.PathLike) -> UploadResult:
    """Colab's own file picker (blocks until files are chosen), saved as :func:`save_uploads`
    saves them. Colab's ipywidgets FileUpload drops files over about 1 MB, i.e. most photos."""
    from google.colab import files  # type: ignore[import-not-found]

    # _upload_files returns the bytes without also writing copies into the current folder.
    picker = getattr(files, "_upload_files", None)
    uploaded = picker(multiple=True) if picker is not None else files.upload()
    result = save_uploads(({"name": name, "content": data} for name, data in uploaded.items()),
                          folder)
    print(result.summary())
    return result


def upload_images(folder: str | os.PathLike) -> UploadBox | UploadResult:
    """Let the user upload images into ``folder``: Colab's picker on Colab, else an
    :class:`UploadBox` (displayed, and returned)."""
    from IPython.display import display

    from .environment import on_colab

    if on_colab():
        return colab_upload(folder)
    box = UploadBox(folder)
    display(box.widget)
    return box


# ----------------------------------------------------------------------------- looking
def caption_grid(folder: str | os.PathLike, *, limit: int = GRID_LIMIT, size: int = 160,
                 columns: int = 6) -> Image.Image | None:
    """The first ``limit`` images of ``folder``, each labelled with its name and caption.

    None when the folder holds no image. An unreadable image or caption shows as such.
    """
    try:
        paths = list_image_files(Path(folder).expanduser())[:limit]
    except FileNotFoundError:
        return None
    return captioned_grid(paths, size=size, columns=columns)


def captioned_grid(paths: Iterable[str | os.PathLike], *, size: int = 160,
                   columns: int = 6) -> Image.Image | None:
    """These images in a grid, each labelled with its name and caption; None for no image."""
    paths = [Path(p) for p in paths]
    if not paths:
        return None
    tiles, labels = [], []
    for path in paths:
        try:
            tile = ImageOps.pad(load_image(path), (size, size), color="white")
        except Exception as exc:  # any decoder error: show the tile, the report says more
            tile = Image.new("RGB", (size, size), (230, 200, 200))
            labels.append(f"{path.name}: unreadable ({type(exc).__name__})")
            tiles.append(tile)
            continue
        try:
            caption = read_caption(path)
        except PromptError:
            caption = "(caption file is not UTF-8)"
        labels.append(_shorten(f"{path.name}: {caption}", CAPTION_CHARS))
        tiles.append(tile)
    return image_grid(tiles, labels, columns=min(columns, len(tiles)))


def crop_preview(folder: str | os.PathLike, resolution: int, *, count: int = 3,
                 size: int | None = None, seed: int = 0) -> Image.Image | None:
    """For the first ``count`` images: the whole image, the center crop and a random crop at the
    training ``resolution`` (shown at ``size`` pixels, default up to 256). None if no image."""
    try:
        paths = list_image_files(Path(folder).expanduser())[:count]
    except FileNotFoundError:
        return None
    size = size or min(resolution, 256)
    rng = random.Random(seed)
    tiles, labels = [], []
    for path in paths:
        try:
            image = load_image(path)
        except Exception:
            continue  # reported by the data check
        tiles += [ImageOps.pad(image, (size, size), color="white"),
                  crop_and_resize(image, resolution, True).resize((size, size)),
                  crop_and_resize(image, resolution, False, rng).resize((size, size))]
        labels += [f"{path.name} ({image.width}x{image.height})",
                   f"center crop {resolution}", f"random crop {resolution}"]
    return image_grid(tiles, labels, columns=3) if tiles else None


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


# ----------------------------------------------------------------------------- checking
@dataclass
class DataReport:
    """Every problem with a configuration's training data, and what will train."""

    errors: list[str] = field(default_factory=list)  # training refuses to start
    warnings: list[str] = field(default_factory=list)  # trains anyway, but look at them
    instance_images: int = 0
    class_images: dict[int, int] = field(default_factory=dict)  # concept index -> count
    prompts: list[tuple[str, str]] = field(default_factory=list)  # (image, prompt), a few

    @property
    def ok(self) -> bool:
        """True when nothing stops training."""
        return not self.errors

    def __str__(self) -> str:
        lines = [f"{self.instance_images} instance image(s)"
                 + "".join(f", concept {i + 1}: {n} class image(s)"
                           for i, n in self.class_images.items())]
        lines += [f"ERROR {e}" for e in self.errors] + [f"warning {m}" for m in self.warnings]
        lines += [f"prompt of {name}: {prompt}" for name, prompt in self.prompts]
        if self.ok:
            lines.append("No problem stops training.")
        return "\n".join(lines)

    def _repr_pretty_(self, printer, cycle: bool) -> None:  # IPython's text/plain
        printer.text(str(self))

    def _repr_html_(self) -> str:
        def items(values: list[str], colour: str) -> str:
            return "".join(f"<li style='color:{colour}'>{html.escape(v)}</li>" for v in values)

        head = html.escape(str(self).splitlines()[0])
        verdict = ("<b style='color:#2e7d32'>&#10004; No problem stops training.</b>" if self.ok
                   else f"<b style='color:#c62828'>{len(self.errors)} problem(s) stop training:"
                        "</b>")
        prompts = "".join(f"<li><code>{html.escape(n)}</code>: {html.escape(p)}</li>"
                          for n, p in self.prompts)
        return (f"<div>{head}<br>{verdict}<ul>{items(self.errors, '#c62828')}"
                f"{items(self.warnings, '#ef6c00')}</ul>"
                + (f"Prompts they train with (first {len(self.prompts)}):<ul>{prompts}</ul>"
                   if prompts else "") + "</div>")


def data_report(config: DreamBoothConfig, *, prompts: int = 6) -> DataReport:
    """Check the concepts' settings, every image and caption, and the class folders.

    Class images that are still missing are warnings here (they can be generated next).
    """
    report = DataReport()
    # The concept settings (prompts, tokens); the device does not matter for these. Instance
    # folders are left to collect_training_data, which says the same with more detail.
    report.errors += [str(p) for p in validate(config, DeviceInfo.cpu(), check_paths=True)
                      if p.where.startswith("concept")
                      and not p.where.endswith("instance_data_dir")]
    try:
        data = collect_training_data(resolve_concepts(config), require_class_images=False)
    except DataError as exc:
        report.errors += exc.problems
        return report
    except ConfigError as exc:
        report.errors += [str(p) for p in exc.problems]
        return report
    report.warnings += data.warnings
    report.instance_images = len(data.instance)
    report.class_images = {i: len(v) for i, v in data.classes.items()}
    report.prompts = [(e.image.name, e.prompt) for e in data.instance[:prompts]]
    return report


def show_images(config: DreamBoothConfig) -> None:
    """Display each concept's captioned image grid and crop preview in the notebook."""
    from IPython.display import HTML, display

    for number, concept in enumerate(config.concepts_list, start=1):
        folder = concept.instance_data_dir
        display(HTML(f"<h4>Concept {number}: <code>{html.escape(folder)}</code></h4>"))
        grid = caption_grid(folder) if folder.strip() else None
        if grid is None:
            display(HTML("<i>No image in this folder yet.</i>"))
            continue
        display(grid)
        display(HTML(f"Crops at the training resolution ({config.resolution}); training uses "
                     f"{'the center crop' if config.center_crop else 'a new random crop each time'}"
                     " (Center Crop setting):"))
        display(crop_preview(folder, config.resolution))
