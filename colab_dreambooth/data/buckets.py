"""Aspect-ratio buckets: non-square images train at their own shape instead of a square crop.

The buckets are sizes of about the training resolution's pixel count whose sides are multiples
of 64 (the UNet halves a latent three times), built as kohya's sd-scripts builds them: for each
width from the smallest to the largest side, the tallest height whose area stays within
``resolution**2``, and the same turned sideways. Every image (instance and class) goes to the
bucket nearest its aspect ratio and is resized to cover it; only the sliver that differs
between the two aspect ratios is cropped, so the subject stays in the picture.

:class:`colab_dreambooth.data.samplers.BucketBatchSampler` draws every batch from one bucket, in
an order that is a pure function of ``(seed, epoch)`` like
:class:`colab_dreambooth.data.samplers.EpochBatchSampler`, so exact resume and accelerate's
sharding of whole batches over processes keep working.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path
from typing import Iterable

from PIL import Image

from colab_dreambooth.data.images import cover_and_crop

STEP = 64
Size = tuple[int, int]  # (width, height) in pixels


def bucket_limits(resolution: int, min_size: int | None, max_size: int | None) -> tuple[int, int]:
    """The smallest and largest bucket side: the given ones, else half and twice the
    resolution (kohya's 256 and 1024 at 512), rounded to multiples of 64."""
    low = min_size if min_size else max(STEP, resolution // 2 // STEP * STEP)
    high = max_size if max_size else resolution * 2
    return low, high


def bucket_sizes(resolution: int, min_size: int | None = None,
                 max_size: int | None = None) -> list[Size]:
    """Every bucket for ``resolution``: the square, and for each width from the smallest to the
    largest side (steps of 64) the tallest height with ``width * height <= resolution**2``,
    both ways round. Sorted by aspect ratio (width / height)."""
    low, high = bucket_limits(resolution, min_size, max_size)
    area = resolution * resolution
    side = resolution // STEP * STEP
    sizes = {(side, side)}
    for width in range(low, high + 1, STEP):
        height = min(high, area // width // STEP * STEP)
        if height >= low:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0] * s[1]))


def nearest_bucket(width: int, height: int, sizes: Iterable[Size]) -> Size:
    """The bucket whose aspect ratio is nearest the image's (compared as log ratios, so 2:1 and
    1:2 are treated alike); among equals the larger bucket."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - ratio), -s[0] * s[1]))


def fit_to_bucket(image: Image.Image, size: Size, center_crop: bool,
                  rng: random.Random | None = None) -> Image.Image:
    """Resize ``image`` to cover ``size`` and crop what sticks out (centred, or at a place
    drawn from ``rng``): an image of the bucket's own aspect ratio loses nothing."""
    return cover_and_crop(image, size, center_crop, rng).image


def oriented_size(path: Path) -> Size:
    """An image's width and height as it will be trained: after its EXIF rotation (read from
    the header; the pixels are not decoded)."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def assign_buckets(images: Iterable[Path], resolution: int, min_size: int | None = None,
                   max_size: int | None = None) -> dict[Path, Size]:
    """Each image's bucket (its nearest aspect ratio among :func:`bucket_sizes`)."""
    sizes = bucket_sizes(resolution, min_size, max_size)
    return {path: nearest_bucket(*oriented_size(path), sizes) for path in images}


def bucket_report(instance: Iterable[Path], classes: Iterable[Path],
                  bucket_of: dict[Path, Size]) -> str:
    """A table of how many instance and class images fell into each bucket."""
    inst = Counter(bucket_of[p] for p in instance)
    cls = Counter(bucket_of[p] for p in classes)
    lines = ["Aspect-ratio buckets (width x height: instance images, class images):"]
    for size in sorted(set(inst) | set(cls), key=lambda s: (s[0] / s[1], s[0] * s[1])):
        ratio = size[0] / size[1]
        lines.append(f"  {size[0]:>4} x {size[1]:<4} ({ratio:.2f}:1)  {inst[size]:>5}  "
                     f"{cls[size]:>5}")
    return "\n".join(lines)


