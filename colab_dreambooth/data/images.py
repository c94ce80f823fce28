"""Image side of the data path: find, check, load and prepare training images.

Nothing here writes to disk: uploaded photos belong to the user, so problems are
reported (all at once, with the file and what to do) rather than "fixed" in place.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from colab_dreambooth.files import IMAGE_EXTENSIONS, visible_files

# PIL format names each extension may hold. MPO is PIL's name for the multi-picture
# JPEGs many phones and cameras write, so it is still a proper .jpg.
_FORMATS = {".jpg": ("JPEG", "MPO"), ".jpeg": ("JPEG", "MPO"), ".png": ("PNG",),
            ".webp": ("WEBP",), ".bmp": ("BMP",)}
_EXTENSION_FOR = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp"}
_UNSUPPORTED = {".gif": "GIF", ".heic": "HEIC", ".heif": "HEIF", ".tif": "TIFF",
                ".tiff": "TIFF", ".avif": "AVIF", ".jfif": "JFIF"}
# ISO-BMFF brands PIL usually cannot decode: iPhone photos renamed to .jpg are common.
_BMFF_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC", b"heim": "HEIC",
                b"heis": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}
_MIN_SIDE = 8  # below this an image is junk (icon, tracking pixel), whatever the resolution
_ORIENTATION_TAG = 0x0112
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


@dataclass(frozen=True)
class ImageProblem:
    """One problem found with a training image or folder."""

    path: Path
    message: str
    severity: str = "error"  # "error": not used for training; "warning": used anyway

    def __post_init__(self) -> None:
        if self.severity not in ("error", "warning"):
            raise ValueError(f"severity must be 'error' or 'warning', not {self.severity!r}")

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def load_image(path: str | Path) -> Image.Image:
    """Open an image fully and return it as an upright 8-bit RGB image.

    EXIF orientation is applied, 16-bit/float data is scaled to 8 bits, and any
    transparency is composited onto white. Raises OSError (or another PIL error) for
    unreadable or truncated files; the file itself is never modified.
    """
    with _pil_limits(), Image.open(path) as im:
        im.load()  # force a full decode so truncated files fail here, not mid-training
        return _to_rgb(ImageOps.exif_transpose(im))


def check_images(folder: str | Path, resolution: int, *,
                 min_fraction: float = 0.5) -> tuple[list[Path], list[ImageProblem]]:
    """Check every file in `folder`; return (usable image paths, all problems found).

    An image is usable unless it has an "error" problem. Images whose shorter side is
    below ``min_fraction * resolution`` are errors because upscaling makes them blurry.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    folder = Path(folder)
    what = f"put your training images ({', '.join(IMAGE_EXTENSIONS)}) in it"
    if not folder.exists():
        return [], [ImageProblem(folder, f"folder does not exist; create it and {what}")]
    if not folder.is_dir():
        return [], [ImageProblem(folder, f"is a file, not a folder; give a folder and {what}")]

    usable: list[Path] = []
    problems: list[ImageProblem] = []
    candidates = captions = 0  # to say why a folder has nothing usable
    for path in visible_files(folder):
        ext = path.suffix.lower()
        if ext == ".txt":
            captions += 1
        elif ext in _UNSUPPORTED:
            problems.append(ImageProblem(path, _unsupported_message(ext)))
        elif ext not in IMAGE_EXTENSIONS:
            problems.append(ImageProblem(path, "is not a supported image type and will be ignored",
                                         "warning"))
        else:
            candidates += 1
            found = _check_file(path, resolution, min_fraction)
            problems += found
            if all(p.severity != "error" for p in found):
                usable.append(path)

    if not usable:
        if candidates:
            why = f"none of its {candidates} image files can be used (see the problems above); fix or replace them"
        elif captions:
            why = f"it holds only .txt caption files; {what}, next to their captions"
        else:
            why = what
        problems.append(ImageProblem(folder, f"no usable training image in this folder: {why}"))
    return usable, problems


def check_folders(folders: Iterable[str | Path], resolution: int, *,
                  min_fraction: float = 0.5) -> list[ImageProblem]:
    """Return the problems of all `folders` (see check_images), in order."""
    return [p for folder in folders
            for p in check_images(folder, resolution, min_fraction=min_fraction)[1]]


@dataclass(frozen=True)
class Crop:
    """An image resized to cover a size and cropped to it, and where the crop came from: what
    SDXL is conditioned on (original size, crop top-left, target size)."""

    image: Image.Image
    original_size: tuple[int, int]  # (width, height) before resizing
    cover_size: tuple[int, int]  # (width, height) after resizing, before the crop
    left: int
    top: int

    def time_ids(self, flipped: bool = False) -> tuple[int, int, int, int, int, int]:
        """SDXL's size/crop conditioning: original (height, width), the crop's (top, left) in
        the resized image (mirrored when the image is flipped) and the target (height, width),
        in diffusers' and kohya's order."""
        width, height = self.image.size
        left = self.cover_size[0] - self.left - width if flipped else self.left
        return (self.original_size[1], self.original_size[0], self.top, left, height, width)


def cover_and_crop(image: Image.Image, size: tuple[int, int], center_crop: bool,
                   rng: random.Random | None = None) -> Crop:
    """Resize ``image`` to cover ``size`` (width, height) and crop what sticks out: centred
    when ``center_crop``, otherwise at a place drawn from ``rng`` (a fresh unseeded generator
    when None). An image of the size's own aspect ratio loses nothing."""
    width, height = size
    original = image.size
    scale = max(width / image.width, height / image.height)
    cover = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if cover != image.size:
        image = image.resize(cover, Image.Resampling.LANCZOS)
    spare_x, spare_y = cover[0] - width, cover[1] - height
    if center_crop:
        left, top = spare_x // 2, spare_y // 2
    else:
        rng = rng if rng is not None else random.Random()
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    if (spare_x, spare_y) != (0, 0):
        image = image.crop((left, top, left + width, top + height))
    return Crop(image, original, cover, left, top)


def crop_and_resize(image: Image.Image, resolution: int, center_crop: bool,
                    rng: random.Random | None = None) -> Image.Image:
    """Resize so the short side is `resolution`, then crop a resolution x resolution square.

    The crop is centred when `center_crop`, otherwise placed at random using `rng`
    (a fresh unseeded generator when None). Same result as center-cropping to a square
    first and resizing, as the A1111 extension describes it.
    """
    return cover_and_crop(image, (resolution, resolution), center_crop, rng).image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """Convert an image to a float32 CHW tensor in [-1, 1], as the VAE expects."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))) / 127.5 - 1.0


def hflip(tensor: torch.Tensor) -> torch.Tensor:
    """Flip a CHW (or NCHW) image tensor left to right."""
    return torch.flip(tensor, dims=(-1,))


# --- internals -------------------------------------------------------------------


@contextmanager
def _pil_limits() -> Iterator[None]:
    """Let huge photos through PIL's bomb check, make truncation fail; restore after."""
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


# A file's problems by (path, size, modification time, resolution, min_fraction): forms
# re-count class images on every keystroke, and decoding hundreds of images each time would
# freeze them. A changed file has another size or time, so it is checked again.
_CHECKED: dict[tuple, list[ImageProblem]] = {}
_CHECKED_MAX = 50_000


def _check_file(path: Path, resolution: int, min_fraction: float) -> list[ImageProblem]:
    stat = path.stat()
    key = (str(path.absolute()), stat.st_size, stat.st_mtime_ns, resolution, min_fraction)
    found = _CHECKED.get(key)
    if found is None:
        found = _decode_and_check(path, resolution, min_fraction)
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.clear()
        _CHECKED[key] = found
    return list(found)


def _decode_and_check(path: Path, resolution: int, min_fraction: float) -> list[ImageProblem]:
    if path.stat().st_size == 0:
        return [ImageProblem(path, "is empty (0 bytes); the upload or copy probably failed, upload it again")]
    try:
        with _pil_limits(), Image.open(path) as im:
            fmt, (w, h) = im.format, im.size
            if im.getexif().get(_ORIENTATION_TAG) in (5, 6, 7, 8):
                w, h = h, w  # report the size the user sees in a viewer
            if fmt in ("JPEG", "MPO"):
                # Decode at reduced scale: much faster, but still reads the whole stream.
                im.draft(im.mode, (resolution, resolution))
            im.load()
            _to_rgb(ImageOps.exif_transpose(im))  # same path as load_image, so it won't fail later
    except UnidentifiedImageError:
        return [ImageProblem(path, _unidentified_message(path))]
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib errors...
        if "truncated" in str(exc).lower():
            return [ImageProblem(path, "is truncated (the file is incomplete; the upload or download "
                                       "was probably cut off); upload it again")]
        return [ImageProblem(path, f"is corrupt and cannot be decoded ({exc}); re-export it or remove it")]

    problems = []
    if fmt not in _FORMATS[path.suffix.lower()]:
        right = _EXTENSION_FOR.get(fmt)
        fix = f"rename it to {path.stem}{right}" if right else "convert it to PNG or JPEG"
        problems.append(ImageProblem(path, f"contains {fmt} data but is named {path.suffix}; {fix}",
                                     "warning"))
    short, needed = min(w, h), min_fraction * resolution
    if short < _MIN_SIDE:
        problems.append(ImageProblem(path, f"is only {w}x{h} pixels, far too small to train on; remove it"))
    elif short < needed:
        problems.append(ImageProblem(
            path, f"is {w}x{h} pixels but the resolution is {resolution}: its shorter side is below "
                  f"{needed:g} px, so it would be blurry when upscaled; use a larger image, remove it, or "
                  "train at a lower resolution (the resolution field, --resolution)"))
    return problems


def _unsupported_message(ext: str) -> str:
    if ext == ".jfif":
        return "JFIF files are JPEGs; rename it to .jpg"
    return f"{_UNSUPPORTED[ext]} images are not supported; convert it to PNG or JPEG"


def _unidentified_message(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(12)
    if head[4:8] == b"ftyp" and head[8:12] in _BMFF_BRANDS:
        return f"contains {_BMFF_BRANDS[head[8:12]]} data, which is not supported; convert it to PNG or JPEG"
    return "is not a readable image (wrong or damaged file); re-export or re-download it, or remove it"


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, compositing transparency onto white."""
    if im.mode in _HIGH_DEPTH_MODES:
        im = _to_8bit_grey(im)
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")  # also applies palette / tRNS transparency
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _to_8bit_grey(im: Image.Image) -> Image.Image:
    # PIL's own convert() clips 16-bit values at 255 (a white image); scale instead.
    arr = np.nan_to_num(np.asarray(im, dtype=np.float64))
    if im.mode == "F":
        arr = arr * 255 if arr.max(initial=0) <= 1 else arr  # float data is 0..1 or 0..255
    else:
        arr = arr / 257  # 16-bit range: 65535 -> 255 exactly
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
