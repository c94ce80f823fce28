"""Rehydrate: rebuild a trained diffusers folder from a dehydrated file and its base model.

Nothing is written before the file's checksum and the base's fingerprint match; a lossless
file's rebuilt weights files are checked byte for byte (SHA-256) against the trained ones.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from colab_dreambooth.files import save_folder_atomic
from colab_dreambooth.models.loading import resolve_model_folder
from colab_dreambooth.models.single_file.base_weights import BaseWeights
from colab_dreambooth.models.single_file.dehydrate import human_size
from colab_dreambooth.models.single_file.dehydrate_codec import LOSSLESS, PARTS, decode
from colab_dreambooth.models.single_file.dehydrated_file import (
    DehydratedInfo,
    DehydrateError,
    inside,
    read_info,
    safe_relpath,
    safetensors_errors,
    verify_payload,
)
from colab_dreambooth.safetensors_stream import (
    DTYPES,
    SafetensorsReader,
    parse_layout,
    tensor_bytes,
)

log = logging.getLogger(__name__)


@dataclass
class RehydrateResult:
    """What :func:`rehydrate` rebuilt."""

    path: Path  # the rebuilt diffusers folder
    mode: str
    rank: int | None
    bytes_written: int
    verified: bool  # lossless: every weights file matched the trained file's SHA-256
    seconds: float = 0.0

    def summary(self) -> str:
        """One or two lines for people."""
        check = ("every weights file is byte-identical to the trained one (SHA-256 checked)"
                 if self.verified else f"low-rank approximation (rank {self.rank})")
        return (f"Rebuilt {self.path} ({human_size(self.bytes_written)}) in {self.seconds:.1f} s: "
                f"{check}.")


@safetensors_errors()
def rehydrate(file: str | os.PathLike, base: str | os.PathLike, out_dir: str | os.PathLike, *,
              overwrite: bool = False, progress: bool = True) -> RehydrateResult:
    """Rebuild the trained diffusers folder from a dehydrated ``file`` and its ``base`` model.

    Refuses a base whose weights fingerprint differs from the recorded one, and a damaged file,
    before writing anything. ``out_dir`` is written atomically; an existing non-empty folder is
    replaced only with ``overwrite``.
    """
    start = time.monotonic()
    file = Path(file).expanduser()
    info = read_info(file)
    verify_payload(file, info.payload_sha256, progress)
    base_folder = resolve_model_folder(str(base))
    out = Path(out_dir).expanduser()
    _check_out_dir(out, file, base_folder, overwrite)
    log.info("Rehydrating %s onto the base %s (%s) into %s", file, base, base_folder, out)
    base_weights = BaseWeights(base_folder)
    fingerprint = base_weights.fingerprint(info.base_subfolders, progress=progress)
    if fingerprint != info.base_fingerprint:
        raise DehydrateError(
            f"{file} was made from the base model '{info.base_name}' with weights fingerprint "
            f"{info.base_fingerprint}, but {base} ({base_folder}) has fingerprint {fingerprint}. "
            "Rehydrate onto the exact base model it was dehydrated from (same weights, same "
            "dtype): the difference stored in the file only makes sense on top of that one.")
    written = [0]

    def write(folder: Path) -> None:
        with SafetensorsReader(file) as stored:
            for record in info.files:
                data = _unpack(stored, f"file::{record['path']}", file)
                if hashlib.sha256(data).hexdigest() != record["sha256"]:
                    raise DehydrateError(f"{file}: the stored {record['path']} is damaged "
                                         "(checksum mismatch); dehydrate the model again")
                target = folder / safe_relpath(record["path"], file)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                written[0] += len(data)
            for record in info.weights:
                written[0] += _rebuild_weights(stored, file, info, record, base_weights, folder,
                                               progress)

    try:
        save_folder_atomic(write, out)
    finally:
        base_weights.close()
    return RehydrateResult(path=out, mode=info.mode, rank=info.rank, bytes_written=written[0],
                           verified=info.mode == LOSSLESS, seconds=time.monotonic() - start)


def _check_out_dir(out: Path, file: Path, base: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DehydrateError(f"{out} exists and is not a folder: name a folder to write")
    if inside(out, base) or inside(base, out):
        raise DehydrateError(f"{out} overlaps the base model's folder {base}: rebuild the model "
                             "into a folder of its own")
    if inside(file, out):
        raise DehydrateError(f"{file} is inside {out}, which would be replaced: rebuild into "
                             "another folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DehydrateError(f"{out} already exists and is not empty: choose another folder, or "
                             "pass --overwrite (overwrite=True) to replace it")


def _unpack(stored: SafetensorsReader, key: str, file: Path) -> bytes:
    try:
        return zlib.decompress(tensor_bytes(stored.get(key)).tobytes())
    except (zlib.error, KeyError) as exc:
        raise DehydrateError(f"{file}: its copy of {key.split('::', 1)[1]} is missing or damaged "
                             f"({exc}); dehydrate the model again") from exc


def _rebuild_weights(stored: SafetensorsReader, file: Path, info: DehydratedInfo, record: dict,
                     base: BaseWeights, folder: Path, progress: bool) -> int:
    """Write one weights file, tensor by tensor, with the trained file's own header."""
    rel = record["path"]
    layout = parse_layout(_unpack(stored, f"layout::{rel}", file), file)
    target = folder / safe_relpath(rel, file)
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(layout.header)
    kinds = record["kinds"]
    with open(target, "wb") as out:
        out.write(layout.header)
        for name, tinfo in tqdm(layout.tensors, desc=f"rehydrate {rel}", unit="tensor",
                                disable=not progress):
            dtype, shape = DTYPES[tinfo["dtype"]], list(tinfo["shape"])
            kind = kinds.get(name, "same")
            try:
                parts = {p: stored.get(f"{rel}::{name}::{p}") for p in PARTS[kind]}
                t = decode(kind, parts, base.get(record["base_subfolder"], name), shape, dtype)
            except (KeyError, RuntimeError) as exc:  # a missing part or base tensor
                raise DehydrateError(f"{file}: cannot rebuild {rel} tensor {name} ({kind}): "
                                     f"{exc}. The file is damaged; dehydrate the model "
                                     "again") from exc
            if t.dtype != dtype or list(t.shape) != shape:
                raise DehydrateError(f"{file}: rebuilt {rel} tensor {name} has the wrong "
                                     "shape or dtype; the file is damaged")
            data = tensor_bytes(t)
            out.write(data)
            digest.update(data)
    if info.mode == LOSSLESS and digest.hexdigest() != record["sha256"]:
        raise DehydrateError(f"{file}: the rebuilt {rel} differs from the trained one (SHA-256 "
                             "mismatch), so the file or the base model is damaged; nothing was "
                             "written")
    return target.stat().st_size


__all__ = ["rehydrate", "RehydrateResult"]
