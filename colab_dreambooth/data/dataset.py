"""The training data: which images train, with which prompts, and how batches are formed.

:func:`collect_training_data` reads every concept's instance and class folders, checks every
image and builds every prompt before any model is loaded, and raises one :class:`DataError`
listing all that is wrong. :class:`DreamBoothDataset` then yields instance images paired with a
class image of the same concept (prior preservation), as pixels or as cached latents.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from colab_dreambooth.config.prompts import PromptError, build_prompts, shuffle_tags
from colab_dreambooth.data.captions import image_caption
from colab_dreambooth.data.images import (
    Crop,
    ImageProblem,
    check_images,
    cover_and_crop,
    hflip,
    load_image,
    to_tensor,
)
from colab_dreambooth.errors import UserError

if TYPE_CHECKING:
    from colab_dreambooth.config.settings import DreamBoothConfig


class DataError(UserError, ValueError):
    """The training data cannot be used; ``problems`` lists every reason (file and fix)."""

    def __init__(self, problems: list[str], warnings: list[str] | None = None):
        self.problems = problems
        self.warnings = list(warnings or [])  # found alongside, for a report of everything
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) with the training data:\n{lines}")


@dataclass(frozen=True)
class Example:
    """One training image and the prompt it trains with."""

    image: Path
    prompt: str
    concept: int  # 0-based index into the config's concepts_list


@dataclass
class TrainingData:
    """Every instance example, and the class examples of each concept that has them."""

    instance: list[Example]
    classes: dict[int, list[Example]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def with_prior_preservation(self) -> bool:
        """True when any concept trains with class images."""
        return any(self.classes.values())


def collect_training_data(config: "DreamBoothConfig", *,
                          require_class_images: bool = True) -> TrainingData:
    """Check all images and build all prompts of ``config``'s concepts.

    Raises :class:`DataError` with every unreadable, truncated, too-small or mislabelled file,
    empty or missing folder, unusable caption and missing class image at once.
    ``require_class_images=False`` accepts class folders that still lack images (to show the
    prompts before class images are generated).
    """
    problems: list[str] = []
    data = TrainingData(instance=[])
    for index, concept in enumerate(config.concepts_list):
        label = f"concept {index + 1}"
        if not concept.instance_data_dir.strip():
            # Path("") is the current folder: never train on whatever happens to be there.
            problems.append(f"{label}: the Instance dataset directory is blank: set the folder "
                            "that holds the subject's images")
            images = []
        else:
            images, image_problems = check_images(Path(concept.instance_data_dir).expanduser(),
                                                  config.resolution)
            _sort_problems(image_problems, label, "instance", problems, data.warnings)
        for path in images:
            prompt = _prompt_for(path, concept, label, problems, "instance")
            if prompt is not None:
                data.instance.append(Example(path, prompt, index))
        if concept.wants_prior_preservation:
            data.classes[index] = _class_examples(config, index, problems, data.warnings,
                                                  require_class_images)
    if problems:
        raise DataError(problems, data.warnings)
    return data


def _class_examples(config: "DreamBoothConfig", index: int, problems: list[str],
                    warnings: list[str], required: bool) -> list[Example]:
    concept = config.concepts_list[index]
    label = f"concept {index + 1}"
    folder = config.class_dir(index)
    wanted = concept.num_class_images
    images: list[Path] = []
    if folder.is_dir():
        images, image_problems = check_images(folder, config.resolution)
        # An empty class folder is reported below with the count; no need to say it twice.
        image_problems = [p for p in image_problems if p.path != folder]
        _sort_problems(image_problems, label, "class", problems, warnings)
    report = problems if required else warnings
    if wanted and len(images) < wanted:
        report.append(f"{label}: the class folder {folder} holds {len(images)} usable images but "
                      f"Total Number of Class Images is {wanted}: generate the missing "
                      f"{wanted - len(images)} with `colab-dreambooth class-images --config "
                      "PARAMS.json` (or notebook 02), add your own, or lower the number")
        if required or not images:
            return []
    elif not images:
        state = "holds no usable image" if folder.is_dir() else "does not exist"
        report.append(f"{label}: the class folder {folder} {state}: add class images, or clear "
                      "the class prompt to train without prior preservation")
        return []
    examples = []
    for path in images[:wanted] if wanted else images:
        prompt = _prompt_for(path, concept, label, problems, "class")
        if prompt is not None:
            examples.append(Example(path, prompt, index))
    return examples


def _prompt_for(path: Path, concept: Any, label: str, problems: list[str], side: str
                ) -> str | None:
    """The prompt ``path`` trains with: the instance prompt of an instance image, the class
    prompt of a class image. Only that side is built (and checked): a class image's caption
    need not give a valid instance prompt, nor an instance image's a valid class prompt."""
    instance_prompt = concept.instance_prompt if side == "instance" else ""
    class_prompt = concept.class_prompt if side == "class" else ""
    try:
        caption = image_caption(path, concept=label)
        prompts = build_prompts(caption.text, instance_prompt, class_prompt,
                                concept.instance_token, concept.class_token,
                                concept.file_prompt_contents, caption_file=caption.source,
                                concept=label)
    except PromptError as exc:
        problems.append(str(exc))
        return None
    return prompts[0] if side == "instance" else prompts[1]


def _sort_problems(found: list[ImageProblem], label: str, kind: str, problems: list[str],
                   warnings: list[str]) -> None:
    for p in found:
        (problems if p.severity == "error" else warnings).append(f"{label} {kind} image {p}")


# ----------------------------------------------------------------------------- batches
class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance examples, each paired with a class example of its concept.

    An item is ``{"instance": (image, prompt, time_ids), "class": (image, prompt, time_ids) |
    None}`` where image is a ``[-1, 1]`` CHW tensor, or, once :meth:`use_latents` is called, a
    cached latent distribution ``(mean, std)`` from which the loop samples, and ``time_ids``
    is the crop's SDXL size/crop conditioning (:meth:`~colab_dreambooth.data.images.Crop.time_ids`;
    other models ignore it).

    Every random choice (crop, flip, which class image, the tag order of Shuffle Tags) is a
    pure function of ``(seed, epoch, index)``: no generator state lives here, so a resumed run
    that sets the epoch sees exactly the items an uninterrupted run saw.

    With ``bucket_of`` (aspect-ratio buckets, :mod:`colab_dreambooth.data.buckets`) each image is
    fitted to its bucket instead of a square crop, and an instance image is paired with a
    class image of its own bucket when the concept has one there, else with the next class
    image of the concept fitted (resized and trimmed) to the instance image's bucket.
    """

    def __init__(self, data: TrainingData, resolution: int, center_crop: bool, flip: bool,
                 seed: int, *, shuffle_tags: bool = False, keep_tokens: int = 1,
                 bucket_of: dict[Path, tuple[int, int]] | None = None):
        self.data = data
        self.shuffle_tags, self.keep_tokens = shuffle_tags, keep_tokens
        # Aspect-ratio buckets: each image's (width, height); None = square crops.
        self.bucket_of = bucket_of
        self.resolution = resolution
        self.center_crop = center_crop
        self.flip = flip
        self.seed = seed
        self.epoch = 0
        # Rank of each instance example within its concept, to walk the class images in turn.
        counts: dict[int, int] = {}
        self._rank = []
        for example in data.instance:
            self._rank.append(counts.get(example.concept, 0))
            counts[example.concept] = self._rank[-1] + 1
        self._per_concept = counts
        # With buckets, class images pair by (concept, bucket), walked in turn the same way.
        self._class_pools: dict[tuple[int, tuple[int, int]], list[Example]] = {}
        self._bucket_rank: list[int] = []
        self._per_bucket: dict[tuple[int, tuple[int, int]], int] = {}
        if bucket_of is not None:
            for concept, pool in data.classes.items():
                for example in pool:
                    key = (concept, bucket_of[example.image])
                    self._class_pools.setdefault(key, []).append(example)
            for example in data.instance:
                key = (example.concept, bucket_of[example.image])
                self._bucket_rank.append(self._per_bucket.get(key, 0))
                self._per_bucket[key] = self._bucket_rank[-1] + 1
        self.latents: dict[tuple, tuple[torch.Tensor, ...]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose crops, flips and class pairings items get."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data.instance)

    def __getitem__(self, i: int) -> dict[str, Any]:
        example = self.data.instance[i]
        rng = self._rng("item", self.epoch, i)
        size = self.size_of(example.image)
        item = {"instance": self._load(example, rng, size), "class": None}
        pool = self.data.classes.get(example.concept)
        same_bucket = self._class_pools.get((example.concept, size))
        if same_bucket:
            # A class image of the instance image's own bucket, each in turn.
            k = self.epoch * self._per_bucket[(example.concept, size)] + self._bucket_rank[i]
            item["class"] = self._load(same_bucket[k % len(same_bucket)], rng, size)
        elif pool:
            # Each epoch takes the next class images in turn, so every one is used (with
            # buckets and none in this one: resized and cropped to the instance's bucket).
            k = self.epoch * self._per_concept[example.concept] + self._rank[i]
            item["class"] = self._load(pool[k % len(pool)], rng, size)
        if self.shuffle_tags:  # its own order per (seed, epoch, index, row): no shared state
            for row in ("instance", "class"):
                if item[row] is not None:
                    image, prompt, time_ids = item[row]
                    item[row] = (image, shuffle_tags(prompt, self.keep_tokens, self.seed,
                                                     self.epoch, i, row), time_ids)
        return item

    def _rng(self, *key: Any) -> random.Random:
        # A string seed is hashed with SHA-512: the same on every run and every machine.
        return random.Random(":".join(map(str, (self.seed,) + key)))

    def _load(self, example: Example, rng: random.Random, size: tuple[int, int]
              ) -> tuple[Any, str, torch.Tensor]:
        flipped = self.flip and rng.random() < 0.5
        if self.latents is not None:
            mean, std, time_ids = self.latents[self.latent_key(example.image, size, flipped)]
            return (mean, std), example.prompt, time_ids
        crop = self.crop(example.image, rng, size)
        pixels = to_tensor(crop.image)
        return ((hflip(pixels) if flipped else pixels), example.prompt,
                torch.tensor(crop.time_ids(flipped), dtype=torch.float32))

    def crop(self, image: Path, rng: random.Random | None = None,
             size: tuple[int, int] | None = None) -> Crop:
        """The image cropped to the training resolution (with buckets: fitted to ``size``,
        default its own bucket): a random crop drawn from ``rng``, else the image's own fixed
        one, as cached latents keep."""
        rng = rng if rng is not None else self._rng("crop", image)
        return cover_and_crop(load_image(image), size or self.size_of(image), self.center_crop,
                              rng)

    def pixels(self, image: Path, rng: random.Random | None = None,
               size: tuple[int, int] | None = None) -> torch.Tensor:
        """:meth:`crop` as a ``[-1, 1]`` tensor."""
        return to_tensor(self.crop(image, rng, size).image)

    def size_of(self, image: Path) -> tuple[int, int]:
        """The (width, height) ``image`` trains at: its bucket, else the square resolution."""
        if self.bucket_of is None:
            return (self.resolution, self.resolution)
        return self.bucket_of[image]

    def latent_key(self, image: Path, size: tuple[int, int], flipped: bool) -> tuple:
        """The cache key of ``image`` at ``size``: ``(image, flipped)`` without buckets,
        ``(image, size, flipped)`` with them."""
        return (image, flipped) if self.bucket_of is None else (image, size, flipped)

    def cache_entries(self) -> list[tuple[Path, tuple[int, int]]]:
        """Every (image, size) an item can show: each image at its own size, and with buckets
        the class images of a concept at each instance bucket that has none of its own."""
        entries = dict.fromkeys((image, self.size_of(image)) for image in self.all_images())
        if self.bucket_of is not None:
            for example in self.data.instance:
                size = self.bucket_of[example.image]
                if not self._class_pools.get((example.concept, size)):
                    entries.update(dict.fromkeys(
                        (c.image, size) for c in self.data.classes.get(example.concept, ())))
        return list(entries)

    def all_images(self) -> list[Path]:
        """Every distinct image the dataset can yield."""
        seen = dict.fromkeys(e.image for e in self.data.instance)
        for pool in self.data.classes.values():
            seen.update(dict.fromkeys(e.image for e in pool))
        return list(seen)

    def use_latents(self, latents: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                    ) -> None:
        """Serve cached latent distributions ``(mean, std, time_ids)`` keyed by
        :meth:`latent_key` instead of pixels."""
        self.latents = latents


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a batch: instance rows first, then the class rows (prior preservation)."""
    rows = [it["instance"] for it in items] + [it["class"] for it in items if it["class"]]
    images = [r[0] for r in rows]
    if isinstance(images[0], tuple):  # cached latent distributions
        pixels = None
        latent_mean = torch.stack([m for m, _ in images])
        latent_std = torch.stack([s for _, s in images])
    else:
        pixels, latent_mean, latent_std = torch.stack(images), None, None
    return {"pixels": pixels, "latent_mean": latent_mean, "latent_std": latent_std,
            "prompts": [r[1] for r in rows], "time_ids": torch.stack([r[2] for r in rows]),
            "num_instance": len(items)}
