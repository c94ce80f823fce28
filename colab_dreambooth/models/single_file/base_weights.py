"""A diffusers folder's weights by sub-folder and name, read one tensor at a time: the base a
trained model is dehydrated against (and its fingerprint), and both models of a LoRA
extraction."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from colab_dreambooth.models.loading import resolve_model_folder
from colab_dreambooth.models.single_file.dehydrated_file import (
    FORMAT,
    DehydrateError,
    safetensors_errors,
)
from colab_dreambooth.safetensors_stream import COPY_CHUNK, SafetensorsReader, read_layout

# The weight sub-folders of a base model (text_encoder_2: SDXL's second text encoder).
BASE_SUBFOLDERS = ("text_encoder", "text_encoder_2", "unet", "vae")
# A trained sub-model whose base counterpart has another name (EMA weights start as the UNet's).
BASE_SUBFOLDER_OF = {"unet_ema": "unet"}

# Weight formats that would need unpickling (or another framework) to read: refused, not copied.
OTHER_WEIGHT_SUFFIXES = {".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".pb"}


class BaseWeights:
    """A model folder's tensors, by sub-folder and name, read one at a time."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._index: dict[str, dict[str, tuple[Path, dict, int]]] = {}
        self._open: dict[Path, SafetensorsReader] = {}

    def index(self, sub: str) -> dict[str, tuple[Path, dict, int]]:
        """{tensor name: (file, header entry, data start)} of sub-folder ``sub`` (may be empty)."""
        if sub not in self._index:
            entries: dict[str, tuple[Path, dict, int]] = {}
            for path in _model_weight_files(self.folder / sub) if sub else []:
                layout = read_layout(path)
                for name, info in layout.tensors:
                    if name in entries:
                        raise DehydrateError(
                            f"the base model's {sub} holds tensor {name} in both "
                            f"{entries[name][0].name} and {path.name}: keep one of the files")
                    entries[name] = (path, info, layout.data_start)
            self._index[sub] = entries
        return self._index[sub]

    def get(self, sub: str | None, name: str) -> torch.Tensor | None:
        """The base tensor ``name`` of sub-folder ``sub``, or None if the base has none."""
        entry = self.index(sub).get(name) if sub else None
        if entry is None:
            return None
        path = entry[0]
        if path not in self._open:
            self._open[path] = SafetensorsReader(path)
        return self._open[path].get(name)

    def fingerprint(self, subs: Iterable[str], *, progress: bool) -> str:
        """SHA-256 over (sub-folder/name, dtype, shape, bytes) of every tensor, in name order."""
        subs = sorted(subs)
        total = sum(info["data_offsets"][1] - info["data_offsets"][0]
                    for sub in subs for _, info, _ in self.index(sub).values())
        digest = hashlib.sha256(f"{FORMAT} base weights v1\n".encode())
        with tqdm(total=total, unit="B", unit_scale=True, desc="fingerprint base",
                  disable=not progress) as bar:
            for sub in subs:
                for name in sorted(self.index(sub)):
                    path, info, start = self.index(sub)[name]
                    digest.update(json.dumps([f"{sub}/{name}", info["dtype"], info["shape"]])
                                  .encode() + b"\n")
                    begin, end = info["data_offsets"]
                    with open(path, "rb") as f:
                        f.seek(start + begin)
                        left = end - begin
                        while left:
                            chunk = f.read(min(left, COPY_CHUNK))
                            if not chunk:
                                raise DehydrateError(f"{path} is truncated")
                            digest.update(chunk)
                            left -= len(chunk)
                            bar.update(len(chunk))
        return "sha256:" + digest.hexdigest()

    def close(self) -> None:
        """Close the files opened so far."""
        for file in self._open.values():
            file.close()
        self._open.clear()


def _model_weight_files(folder: Path) -> list[Path]:
    """One sub-model's safetensors files: the plain ones (maybe sharded), else its variants."""
    if not folder.is_dir():
        return []
    files = sorted(folder.glob("*.safetensors"))
    # "model.fp16.safetensors" is a variant of "model.safetensors"; shards have no extra dot.
    plain = [f for f in files if "." not in f.name[:-len(".safetensors")]]
    if not files and any(folder.glob(f"*{s}") for s in OTHER_WEIGHT_SUFFIXES):
        raise DehydrateError(f"{folder} holds no .safetensors weights (only other formats): "
                             "re-save the model with safetensors")
    return plain or files


def base_subfolder(rel: str, base: BaseWeights) -> str | None:
    """The base's sub-folder that trained weights file ``rel`` is compared with, or None."""
    parts = PurePosixPath(rel).parts
    if len(parts) < 2:
        return None
    for sub in (parts[0], BASE_SUBFOLDER_OF.get(parts[0])):
        if sub and base.index(sub):
            return sub
    return None


@safetensors_errors()
def base_fingerprint(base: str | os.PathLike, subfolders: Sequence[str] = BASE_SUBFOLDERS,
                     *, progress: bool = False) -> str:
    """SHA-256 over name, dtype, shape and bytes of every tensor of the base's ``subfolders``.

    Independent of how the weights are split into files or ordered in them; any changed value,
    dtype or tensor changes it. Sub-folders the base lacks are skipped.
    """
    weights = BaseWeights(resolve_model_folder(str(base)))
    try:
        return weights.fingerprint([s for s in subfolders if weights.index(s)], progress=progress)
    finally:
        weights.close()


__all__ = ["BaseWeights", "base_subfolder", "base_fingerprint", "BASE_SUBFOLDER_OF",
           "BASE_SUBFOLDERS", "OTHER_WEIGHT_SUFFIXES"]
