"""The captioners: models that describe images, for :mod:`colab_dreambooth.data.captioning`.

Two kinds, chosen by a Hub id or a local folder (:func:`load_captioner`):

- a captioning model (BLIP and other transformers image-to-text models) writes a sentence,
  ``a dog sitting on the grass``, as kohya's ``make_captions.py`` does;
- a tagger (SmilingWolf's WD14 taggers, loaded with ``timm``) writes booru-style tags ordered by
  confidence, ``1girl, solo, long hair``, as kohya's ``tag_images_by_wd14_tagger.py`` does
  (for ``shuffle_tags``).

``tiny`` builds a tiny randomly initialised BLIP (or tagger) offline, saved in the package cache
and loaded through the same code as a Hub id: its words are nonsense, but every step is real.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from PIL import Image

from colab_dreambooth.config.prompts import tidy_prompt
from colab_dreambooth.config.validation import looks_like_local_path
from colab_dreambooth.errors import ModelLoadError
from colab_dreambooth.files import cached_folder
from colab_dreambooth.runtime.hub_token import find_token

CAPTION, TAGS = "caption", "tags"  # what a captioner writes: a sentence, or tags
TINY = "tiny"
DEFAULT_CAPTION_MODEL = "Salesforce/blip-image-captioning-large"
DEFAULT_TAGGER = "SmilingWolf/wd-vit-tagger-v3"
TAGS_FILE = "selected_tags.csv"  # the WD14 taggers' label list: tag_id,name,category,count
# WD14 label categories; kohya's defaults for the two thresholds (rating tags are dropped).
GENERAL, CHARACTER, RATING = 0, 4, 9
GENERAL_THRESHOLD, CHARACTER_THRESHOLD = 0.35, 0.85
TINY_VERSION = "1"
_TINY_TAGGER_CONFIG = "tiny_tagger.json"  # marks the tiny tagger's folder
# Words BLIP-large is known to invent ("arafed", "araffe", "arafly"...): dropped.
_BLIP_ARTEFACTS = re.compile(r"\b(?:ara+f+\w*|arafed)\b\s*", re.IGNORECASE)
_PathLike = str | os.PathLike[str]


class Captioner(Protocol):
    """Anything that describes images: a sentence (``kind`` "caption") or tags ("tags")."""

    kind: str
    name: str

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One text per image, in order; ``""`` where the model found nothing to say."""
        ...


def _torch_device(device: str | None) -> tuple[Any, Any]:
    """(device, dtype): the GPU in fp16 when there is one, else the CPU in fp32."""
    import torch

    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if name.startswith("cuda") else torch.float32
    return torch.device(name), dtype


def _is_auth_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return any(k in text for k in ("GatedRepo", "401", "403", "Unauthorized", "gated"))


def _from_hub(load: Callable[..., Any], source: str) -> Any:
    """``load(source)``; for a Hub id that needs a login, again with the user's Hub token.

    Public models load without asking for the token, so Colab shows no secret-access dialog
    for them; the token is passed to the Hub client only, never logged."""
    try:
        return load(source)
    except Exception as exc:
        if Path(source).expanduser().exists() or not _is_auth_error(exc):  # not the Hub's
            raise
        token = find_token(ask_again=True).token
        if not token:
            raise
        return load(source, token=token)


def _load_failed(source: str, what: str, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"could not load the {what} '{source}' ({type(exc).__name__}: {exc}). Check the Hub id "
        "(owner/name) and the network, or give a local folder; a gated model needs a login "
        "(HF_TOKEN); 'tiny' works offline.")


class BlipCaptioner:
    """A transformers image-to-text model (BLIP by default) writing one sentence per image.

    ``source`` is a Hub id or a local folder holding the model and its processor. It runs on
    the GPU in fp16 when there is one, else on the CPU. ``num_beams``, ``max_new_tokens`` and
    ``min_length`` follow kohya's ``make_captions.py`` (beam search, 5 to 75 tokens); ``prompt``
    starts every caption (BLIP's conditional captioning, e.g. "a photography of").
    """

    kind = CAPTION

    def __init__(self, source: str = DEFAULT_CAPTION_MODEL, *, device: str | None = None,
                 num_beams: int = 3, max_new_tokens: int = 75, min_length: int = 5,
                 prompt: str | None = None) -> None:
        import torch
        import transformers
        from transformers import AutoConfig, AutoProcessor

        self.name = source
        self.device, self.dtype = _torch_device(device)
        self.generate_args = {"num_beams": num_beams, "max_new_tokens": max_new_tokens,
                              "min_length": min_length, "no_repeat_ngram_size": 3}
        self.prompt = prompt or None
        try:
            config = _from_hub(AutoConfig.from_pretrained, source)
            self.processor = _from_hub(AutoProcessor.from_pretrained, source)
            if config.model_type == "blip":
                model_class = transformers.BlipForConditionalGeneration
            else:  # GIT, BLIP-2, ...: the generic class of this transformers version
                model_class = (getattr(transformers, "AutoModelForImageTextToText", None)
                               or getattr(transformers, "AutoModelForVision2Seq"))
            model = _from_hub(model_class.from_pretrained, source)
        except Exception as exc:  # the Hub client and transformers raise many types
            raise _load_failed(source, "captioning model", exc) from exc
        self.model = model.to(self.device, self.dtype).eval()
        self._torch = torch

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One sentence per image (``""`` when the model generates nothing)."""
        if not images:
            return []
        kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = [self.prompt] * len(images)
        inputs = self.processor(**kwargs).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with self._torch.inference_mode():
            ids = self.model.generate(**inputs, **self.generate_args)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [tidy_prompt(_BLIP_ARTEFACTS.sub("", t)) for t in texts]


@dataclass(frozen=True)
class Tag:
    """One label of a tagger: its name as the model lists it and its category."""

    name: str
    category: int


def read_tags_file(path: _PathLike) -> list[Tag]:
    """A WD14 ``selected_tags.csv`` (columns ``tag_id,name,category,count``) as tags in order."""
    with open(path, newline="", encoding="utf-8") as f:
        return [Tag(row["name"], int(row["category"])) for row in csv.DictReader(f)]


def format_tag(name: str, *, remove_underscore: bool = True) -> str:
    """A tag as prompts write it: ``long_hair`` -> ``long hair``, ``(`` and ``)`` escaped as
    the WebUI and kohya read them (``ganyu \\(genshin impact\\)``). Short tags keep their
    underscores, as in kohya, since they are faces: ``^_^``, ``o_o``."""
    if remove_underscore and len(name) > 3:
        name = name.replace("_", " ")
    return name.replace("(", "\\(").replace(")", "\\)")


def select_tags(tags: Sequence[Tag], scores: Sequence[float], *,
                general_threshold: float = GENERAL_THRESHOLD,
                character_threshold: float = CHARACTER_THRESHOLD,
                remove_underscore: bool = True) -> list[str]:
    """The tags a tagger's scores (one per tag, 0..1) give, as kohya's WD14 script picks them:
    rating tags dropped, general tags from ``general_threshold`` and character tags from
    ``character_threshold`` up; character tags first, then the general ones, each ordered by
    confidence; formatted by :func:`format_tag`, without duplicates."""
    if len(tags) != len(scores):
        raise ValueError(f"{len(scores)} scores for {len(tags)} tags")
    picked: dict[int, list[tuple[float, str]]] = {CHARACTER: [], GENERAL: []}
    for tag, score in zip(tags, scores):
        threshold = {GENERAL: general_threshold, CHARACTER: character_threshold}.get(tag.category)
        if threshold is not None and score >= threshold:
            picked[tag.category].append((float(score), tag.name))
    names = [name for category in (CHARACTER, GENERAL)
             for _, name in sorted(picked[category], key=lambda p: -p[0])]
    return list(dict.fromkeys(format_tag(n, remove_underscore=remove_underscore) for n in names))


class WD14Tagger:
    """A WD14 tagger: booru-style tags per image, joined with ", " (see :func:`select_tags`).

    ``source`` is a Hub id (``SmilingWolf/wd-vit-tagger-v3``, ``...wd-swinv2-tagger-v3``) or a
    local folder holding a timm model and ``selected_tags.csv``, or the tiny tagger's folder.
    Images are padded to a white square, resized to the model's input size, normalised with its
    mean and std and given in BGR order, as the taggers were trained.
    """

    kind = TAGS

    def __init__(self, source: str = DEFAULT_TAGGER, *, device: str | None = None,
                 general_threshold: float = GENERAL_THRESHOLD,
                 character_threshold: float = CHARACTER_THRESHOLD,
                 remove_underscore: bool = True) -> None:
        import torch

        self.name = source
        self.device, _ = _torch_device(device)  # fp32: the tagger is small and fp16 shifts tags
        self.thresholds = (general_threshold, character_threshold)
        self.remove_underscore = remove_underscore
        folder = Path(source).expanduser()
        try:
            if (folder / _TINY_TAGGER_CONFIG).is_file():
                model, tags_file = _load_tiny_tagger(folder), folder / TAGS_FILE
            else:
                model, tags_file = _load_timm_tagger(source)
            self.tags = read_tags_file(tags_file)
        except ModelLoadError:
            raise
        except Exception as exc:  # the Hub client and timm raise many types
            raise _load_failed(source, "tagger", exc) from exc
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.input_size = tuple(cfg.get("input_size", (3, 448, 448)))[1:]
        self.mean = torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5))).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", (0.5, 0.5, 0.5))).view(1, 3, 1, 1)
        self.model = model.to(self.device).eval()
        self._torch = torch

    def _pixels(self, images: list[Image.Image]) -> Any:
        import numpy as np

        arrays = []
        for image in images:
            side = max(image.size)
            square = Image.new("RGB", (side, side), (255, 255, 255))
            square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            height, width = self.input_size
            resized = square.resize((width, height), Image.BICUBIC)
            arrays.append(np.asarray(resized, dtype=np.float32) / 255.0)
        pixels = self._torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        pixels = (pixels - self.mean) / self.std
        return pixels[:, [2, 1, 0]]  # RGB -> BGR, the order the taggers were trained on

    def caption(self, images: list[Image.Image]) -> list[str]:
        """The tags of each image, most confident first, joined with ", "."""
        if not images:
            return []
        with self._torch.inference_mode():
            scores = self._torch.sigmoid(self.model(self._pixels(images).to(self.device)))
        general, character = self.thresholds
        return [", ".join(select_tags(self.tags, row.float().cpu().tolist(),
                                      general_threshold=general, character_threshold=character,
                                      remove_underscore=self.remove_underscore))
                for row in scores]


def _load_timm_tagger(source: str) -> tuple[Any, Path]:
    """A WD14 tagger through timm, and its ``selected_tags.csv`` (downloaded for a Hub id)."""
    try:
        import timm
    except ImportError:
        raise ModelLoadError(
            "the WD14 tagger needs the package timm (Colab has it): pip install timm") from None
    folder = Path(source).expanduser()
    if folder.is_dir():
        return timm.create_model(f"local-dir:{folder}", pretrained=True), folder / TAGS_FILE
    from huggingface_hub import hf_hub_download

    def tags_file(repo: str, **kwargs: Any) -> str:
        return hf_hub_download(repo, TAGS_FILE, **kwargs)

    # The WD14 taggers are public; timm reads a token only from huggingface_hub's own places.
    model = timm.create_model(f"hf-hub:{source}", pretrained=True)
    return model, Path(_from_hub(tags_file, source))


# ----------------------------------------------------------------------------- tiny models
# Words of the tiny captioner's vocabulary: its sentences are random strings of these.
_TINY_WORDS = ("a an the of on in with and photo picture close up dog cat man woman person "
               "sitting standing lying holding looking grass table chair window street red blue "
               "green white black small large old young smiling").split()
# The tiny tagger's labels (name, category): a rating, a character with parentheses, general
# tags with underscores and a short face, so its output exercises every formatting rule.
_TINY_TAGS = (("general", RATING), ("sensitive", RATING), ("tiny_hero_(test)", CHARACTER),
              ("1girl", GENERAL), ("solo", GENERAL), ("long_hair", GENERAL),
              ("smile", GENERAL), ("outdoors", GENERAL), ("grass", GENERAL), ("^_^", GENERAL),
              ("blue_sky", GENERAL), ("looking_at_viewer", GENERAL))


def tiny_captioner_path() -> Path:
    """The tiny BLIP's folder in the package cache, built on first use (well under a second)."""
    return cached_folder(f"tiny-blip-v{TINY_VERSION}", "config.json", build_tiny_captioner)


def build_tiny_captioner(folder: _PathLike) -> Path:
    """Write a tiny BLIP captioner (random weights, seeded; a BERT tokenizer over a few
    English words) to ``folder``, loadable with ``AutoProcessor``/``from_pretrained``."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]  # [DEC]: BLIP's start
    vocab.write_text("\n".join(special + list(dict.fromkeys(_TINY_WORDS))) + "\n",
                     encoding="utf-8")
    tokenizer = BertTokenizer(str(vocab), bos_token="[DEC]", model_max_length=128)
    ids = dict(bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
               eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    # Weights drawn wider than BLIP's 0.02 so that each image gets its own words.
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, initializer_range=0.3)
    config = BlipConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=128,
                         encoder_hidden_size=32, **ids, **layers),
        vision_config=dict(image_size=32, patch_size=8, **layers),
        projection_dim=32, initializer_range=0.3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BlipForConditionalGeneration(config)
        with torch.no_grad():  # end-of-text more likely: captions of a few words, quick
            model.text_decoder.cls.predictions.decoder.bias[tokenizer.sep_token_id] += 3.0
    model.save_pretrained(folder)
    processor = BlipProcessor(image_processor=BlipImageProcessor(
        size={"height": 32, "width": 32}), tokenizer=tokenizer)
    processor.save_pretrained(folder)  # vocab.txt stays: transformers 4's BertTokenizer reads it
    return folder


def _tiny_tagger_class() -> Any:
    import torch

    class TinyTagger(torch.nn.Module):
        """A 32x32 image -> one logit per tag: a convolution, pooling, a linear layer."""

        def __init__(self, tags: int) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, kernel_size=4, stride=4)
            self.head = torch.nn.Linear(8, tags)
            self.pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5),
                                   "std": (0.5, 0.5, 0.5)}

        def forward(self, pixels: Any) -> Any:
            return self.head(torch.relu(self.conv(pixels)).mean(dim=(2, 3)))

    return TinyTagger


def tiny_tagger_path() -> Path:
    """The tiny tagger's folder in the package cache, built on first use."""
    return cached_folder(f"tiny-tagger-v{TINY_VERSION}", _TINY_TAGGER_CONFIG, build_tiny_tagger)


def build_tiny_tagger(folder: _PathLike) -> Path:
    """Write the tiny tagger (seeded random weights, ``selected_tags.csv`` like WD14's)."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _tiny_tagger_class()(len(_TINY_TAGS))
        with torch.no_grad():  # wider weights: each image gets its own tags and order
            model.conv.weight.mul_(4.0)
            model.head.weight.mul_(4.0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    with open(folder / TAGS_FILE, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["tag_id", "name", "category", "count"])
        writer.writerows((i, name, category, 0) for i, (name, category) in enumerate(_TINY_TAGS))
    (folder / _TINY_TAGGER_CONFIG).write_text(json.dumps({"tags": len(_TINY_TAGS)}),
                                              encoding="utf-8")
    return folder


def _load_tiny_tagger(folder: Path) -> Any:
    from safetensors.torch import load_file

    tags = json.loads((folder / _TINY_TAGGER_CONFIG).read_text(encoding="utf-8"))["tags"]
    model = _tiny_tagger_class()(tags)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model


def looks_like_tagger(source: str) -> bool:
    """True for a WD14 tagger: a folder holding ``selected_tags.csv``, or a Hub id of one
    (``SmilingWolf/wd-...``, or a name with "tagger")."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return (folder / TAGS_FILE).is_file()
    return source.lower().startswith("smilingwolf/") or "tagger" in source.lower()


def load_captioner(model: str | None = None, *, tagger: bool | None = None,
                   device: str | None = None) -> Captioner:
    """The captioner ``model`` names: ``"tiny"``, a Hub id or a local folder (blank: BLIP-large,
    or the WD14 ViT tagger when ``tagger``). ``tagger`` None guesses from the name
    (:func:`looks_like_tagger`). Raises ModelLoadError saying what to do."""
    source = (model or "").strip()
    if tagger is None:
        tagger = bool(source) and source != TINY and looks_like_tagger(source)
    if source == TINY:
        source = str(tiny_tagger_path() if tagger else tiny_captioner_path())
    elif not source:
        source = DEFAULT_TAGGER if tagger else DEFAULT_CAPTION_MODEL
    elif looks_like_local_path(source) and not Path(source).expanduser().is_dir():
        raise ModelLoadError(f"the captioning model folder {source} does not exist: give a "
                             "Hub id (owner/name), a local folder or 'tiny'")
    tiny = (model or "").strip() == TINY
    if tagger:
        captioner: Captioner = WD14Tagger(source, device=device)
    else:
        # The tiny model's random words would run to the 75-token limit on noisy photos: 16
        # keeps it at several images a second on a CPU.
        captioner = BlipCaptioner(source, device=device, **({"max_new_tokens": 16} if tiny
                                                            else {}))
    if tiny:
        captioner.name = "tiny tagger" if tagger else "tiny captioner"  # not a cache path
    return captioner


__all__ = ["CAPTION", "TAGS", "TINY", "DEFAULT_CAPTION_MODEL", "DEFAULT_TAGGER", "GENERAL",
           "CHARACTER", "RATING", "BlipCaptioner", "Captioner", "Tag", "WD14Tagger",
           "build_tiny_captioner", "build_tiny_tagger", "format_tag",
           "load_captioner", "looks_like_tagger", "read_tags_file", "select_tags",
           "tiny_captioner_path", "tiny_tagger_path"]
