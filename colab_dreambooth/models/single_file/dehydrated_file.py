"""The dehydrated file: a ``.safetensors`` file whose metadata holds a manifest (the format,
the base model's fingerprint, the folder's files and weights files) and a SHA-256 of its data.

Here: its error, reading its contents list, its writer, and the checks that keep a damaged or
forged file from writing anything (payload checksum, safe paths) and a token from leaking.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from colab_dreambooth.errors import UserError
from colab_dreambooth.safetensors_stream import (
    COPY_CHUNK,
    Layout,
    SafetensorsError,
    SafetensorsWriter,
    read_layout,
)

FORMAT = "colab-dreambooth-dehydrated"

FORMAT_VERSION = 1

TOKEN_PATTERN = re.compile(rb"hf_[A-Za-z0-9]{30,}")


class DehydrateError(UserError, RuntimeError):
    """Dehydrating or rehydrating failed; the message names the file and what to do."""


@contextmanager
def safetensors_errors() -> Iterator[None]:
    """Report an unreadable ``.safetensors`` file (trained, base or dehydrated) as a
    :class:`DehydrateError` with the same message."""
    try:
        yield
    except SafetensorsError as exc:
        raise DehydrateError(str(exc)) from exc


@dataclass
class DehydratedInfo:
    """The contents list of a dehydrated file (from its header; no weights read)."""

    path: Path
    mode: str
    rank: int | None
    base_name: str
    base_fingerprint: str
    base_subfolders: list[str]
    files: list[dict]  # {"path", "size", "sha256"} of the folder's other files
    weights: list[dict]  # {"path", "size", "sha256", "base_subfolder", "kinds"}
    model_bytes: int
    stored_bytes: dict[str, int]
    errors: dict[str, float]
    weight_errors: dict[str, float]
    payload_sha256: str


def read_info(file: str | os.PathLike) -> DehydratedInfo:
    """Read a dehydrated file's contents list; a clear :class:`DehydrateError` if it is not one."""
    file = Path(file).expanduser()
    if not file.is_file():
        raise DehydrateError(f"dehydrated model file {file} not found")
    try:
        metadata = read_layout(file).metadata
    except SafetensorsError as exc:
        raise DehydrateError(f"{file} is not a readable dehydrated model: it is truncated or "
                             f"corrupt ({exc.problem}). Copy it again, or dehydrate the model "
                             "again.") from exc
    if metadata.get("colab_dreambooth") != FORMAT or "manifest" not in metadata:
        raise DehydrateError(f"{file} is a safetensors file but not a dehydrated model (made by "
                             "'colab-dreambooth dehydrate'); a full model needs no rehydrating")
    try:
        manifest = json.loads(metadata["manifest"])
        if manifest.get("version", 0) > FORMAT_VERSION:
            raise DehydrateError(f"{file} was written by a newer colab-dreambooth (format "
                                 f"{manifest['version']}); upgrade the package to rehydrate it")
        base = manifest["base"]
        return DehydratedInfo(
            path=file, mode=manifest["mode"], rank=manifest["rank"], base_name=base["name"],
            base_fingerprint=base["fingerprint"], base_subfolders=list(base["subfolders"]),
            files=manifest["files"], weights=manifest["weights"],
            model_bytes=manifest["model_bytes"], stored_bytes=manifest["stored_bytes"],
            errors=manifest["errors"], weight_errors=manifest["weight_errors"],
            payload_sha256=metadata["payload_sha256"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DehydrateError(f"{file}: its contents list is damaged ({exc!r}); dehydrate the "
                             "model again") from exc


class PayloadWriter(SafetensorsWriter):
    """The dehydrated file's writer: the metadata leads the header and gains the SHA-256 of the
    data as ``payload_sha256`` (rehydrate checks it before writing anything); the file is
    flushed to the disk when finished."""

    def __init__(self, path: Path, reserve: int):
        super().__init__(path, reserve)
        self.hash = hashlib.sha256()

    def _write_data(self, data: np.ndarray) -> None:
        super()._write_data(data)
        self.hash.update(data)

    def header_json(self, metadata: dict[str, str] | None) -> bytes:
        """The header: ``metadata`` with the data's checksum first, then the tensors."""
        metadata = {**(metadata or {}), "payload_sha256": self.hash.hexdigest()}
        return json.dumps({"__metadata__": metadata, **self.entries},
                          separators=(",", ":")).encode("utf-8")

    def finish(self, metadata: dict[str, str] | None = None) -> None:
        """Write the header and flush the file to the disk."""
        super().finish(metadata)
        os.fsync(self.file.fileno())


def header_reserve(layouts: dict[str, Layout], files: list[str], base: str) -> int:
    """A generous upper bound of the dehydrated file's header size."""
    total = 65536 + 4 * len(base)
    for rel, layout in layouts.items():
        total += 6 * len(rel) + 600
        # Up to three parts per tensor, plus its kind in the (escaped) manifest.
        total += sum(3 * (len(rel) + 2 * len(name) + 140) + 2 * len(name) + 40
                     for name, _ in layout.tensors)
    return total + sum(8 * len(rel) + 600 for rel in files)


def verify_payload(file: Path, expected: str, progress: bool) -> None:
    """Refuse ``file`` unless the SHA-256 of its data is ``expected`` (read in chunks)."""
    with open(file, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + n)
        digest = hashlib.sha256()
        with tqdm(total=file.stat().st_size - 8 - n, unit="B", unit_scale=True,
                  desc=f"check {file.name}", disable=not progress) as bar:
            while chunk := f.read(COPY_CHUNK):
                digest.update(chunk)
                bar.update(len(chunk))
    if digest.hexdigest() != expected:
        raise DehydrateError(f"{file} is corrupt: its data does not match its checksum. Copy it "
                             "again, or dehydrate the model again")


def refuse_token(data: bytes, path: Path) -> None:
    """Refuse ``path``'s ``data`` if it holds a Hugging Face token: checked on everything
    carried over verbatim; the token itself is never echoed."""
    if TOKEN_PATTERN.search(data):
        raise DehydrateError(f"{path} seems to hold a Hugging Face token (hf_...): remove it "
                             "first; the dehydrated file would carry it to whoever gets the file")


def safe_relpath(rel: str, file: Path) -> Path:
    """``rel``, a path stored in ``file``, as a relative path that stays inside the folder it
    is written to; a damaged or forged one is refused."""
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or any(p in ("", ".", "..") for p in parts) \
            or "\\" in rel:
        raise DehydrateError(f"{file} names an unsafe path {rel!r}: it is damaged or forged")
    return Path(*parts)


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (links resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


__all__ = ["FORMAT", "FORMAT_VERSION", "DehydrateError", "DehydratedInfo", "read_info",
           "PayloadWriter", "header_reserve", "verify_payload", "refuse_token", "safe_relpath",
           "inside", "safetensors_errors"]
