"""A stand-in for ``torchvision.transforms``, just what diffusers' DreamBooth example uses.

``benchmarks/example_speed.py`` copies this file to ``<tmp>/torchvision/transforms.py`` when
the venv cannot import torchvision (a CPU torch with PyPI's CUDA torchvision fails on
"operator torchvision::nms does not exist"). Same arithmetic as torchvision on PIL images:
bilinear resize of the shorter side, crop, to a float CHW tensor in [0, 1], normalise.
"""

from __future__ import annotations

import enum
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    """The PIL resampling filters torchvision names."""
    NEAREST = Image.NEAREST
    BILINEAR = Image.BILINEAR
    BICUBIC = Image.BICUBIC
    LANCZOS = Image.LANCZOS


class Compose:
    """Apply the transforms in order."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image):
        for transform in self.transforms:
            image = transform(image)
        return image


class Resize:
    """Resize so the shorter side is ``size`` (an int), or to ``(height, width)``."""

    def __init__(self, size, interpolation: InterpolationMode = InterpolationMode.BILINEAR,
                 antialias: bool = True) -> None:
        self.size, self.interpolation = size, interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if isinstance(self.size, int):
            if width <= height:
                new = (self.size, int(self.size * height / width))
            else:
                new = (int(self.size * width / height), self.size)
        else:
            new = (self.size[1], self.size[0])
        return image if new == image.size else image.resize(new, self.interpolation.value)


def _crop_size(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (size[0], size[1])


class CenterCrop:
    """Crop the centre ``size`` (int or ``(height, width)``)."""

    def __init__(self, size) -> None:
        self.height, self.width = _crop_size(size)

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        top = int(round((height - self.height) / 2.0))
        left = int(round((width - self.width) / 2.0))
        return image.crop((left, top, left + self.width, top + self.height))


class RandomCrop(CenterCrop):
    """Crop ``size`` at a random offset drawn from torch's generator (as torchvision does)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        top = int(torch.randint(0, height - self.height + 1, size=(1,)).item())
        left = int(torch.randint(0, width - self.width + 1, size=(1,)).item())
        return image.crop((left, top, left + self.width, top + self.height))


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        if torch.rand(1).item() < self.p:
            return image.transpose(Image.FLIP_LEFT_RIGHT)
        return image


class ToTensor:
    """PIL image -> float32 CHW tensor in [0, 1]."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)


class Normalize:
    """``(x - mean) / std`` per channel (a one-element list broadcasts)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor - self.mean) / self.std
