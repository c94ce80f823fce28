"""Dehydrate / rehydrate: store a trained model as its difference from the base model.

:func:`dehydrate` turns a trained diffusers folder (as
:func:`colab_dreambooth.training.train.train` saves
it) into one ``.safetensors`` file that holds only what differs from the base model it was
trained from; :func:`rehydrate` rebuilds the folder from that file plus the same base model.

Two modes:

* **lossless** (default): every rebuilt tensor equals the trained one bit for bit, in its saved
  dtype. Per tensor the file holds nothing (unchanged: a frozen VAE costs nothing), the changed
  elements only (index + value, when few changed), the delta in the trained dtype (when
  ``base + delta`` is verified to give the trained tensor back exactly) or else the trained
  tensor itself. The rebuilt weights files are byte-identical to the trained ones, and rehydrate
  checks that against their recorded SHA-256.
* **low-rank** (``rank=R``): the change of each matrix and convolution kernel (reshaped to
  ``out x in*kh*kw``) is stored as its truncated SVD, ``U`` (fp16) ``S`` (fp32) ``Vh`` (fp16),
  whenever that is smaller than storing the change exactly; biases, norms and small or sparse
  changes stay exact. The reconstruction error (relative Frobenius norm of the lost part of the
  fine-tuning change, per sub-model and overall) is measured while writing, as rehydrate will
  rebuild it, and returned. :data:`DEFAULT_RANK` (128) keeps a full SD 1.5 model, UNet + EMA
  UNet + text encoder all trained, under 1 GB (UNet alone about 270 MB at rank 128).

The file records a fingerprint of the base model's weights (SHA-256 over the name, dtype, shape
and full bytes of every tensor of the sub-models it uses) and refuses to rehydrate onto another
base. It also carries the folder's other files (configs, tokenizer, ``model_index.json``,
``params.json``, ``training_info.json``), zlib-compressed, and the trained weights files'
safetensors headers, so the folder comes back as it was. A SHA-256 of the whole payload catches
a damaged file before anything is written.

Everything works one tensor at a time (memory-mapped reads, a streaming writer), so a 4 GB
model dehydrates and rehydrates in the 12.7 GB of RAM of a free Colab.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from colab_dreambooth.errors import UserError
from colab_dreambooth.files import save_folder_atomic, temp_file_beside
from colab_dreambooth.models.loading import resolve_model_folder

log = logging.getLogger(__name__)

FORMAT = "colab-dreambooth-dehydrated"
FORMAT_VERSION = 1
LOSSLESS, LOWRANK = "lossless", "lowrank"
# Rank 128 in fp16 factors: SD 1.5's UNet ~270 MB, its text encoder ~45 MB, so even a model
# with a trained text encoder and an EMA UNet stays under 1 GB (~0.6 GB).
DEFAULT_RANK = 128
FACTOR_DTYPE = torch.float16  # U and Vh have orthonormal columns/rows: |entries| <= 1, no overflow
# A trained sub-model whose base counterpart has another name (EMA weights start as the UNet's).
BASE_SUBFOLDER_OF = {"unet_ema": "unet"}
# Weight formats that would need unpickling (or another framework) to read: refused, not copied.
OTHER_WEIGHT_SUFFIXES = {".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".pb"}
TOKEN_PATTERN = re.compile(rb"hf_[A-Za-z0-9]{30,}")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
_CHUNK = 16 * 1024 * 1024

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class DehydrateError(UserError, RuntimeError):
    """Dehydrating or rehydrating failed; the message names the file and what to do."""


# ----------------------------------------------------------------------------- results
@dataclass
class DehydrateResult:
    """What :func:`dehydrate` wrote and how faithful it is."""

    path: Path
    mode: str  # "lossless" or "lowrank"
    rank: int | None
    base_fingerprint: str
    file_bytes: int  # size of the dehydrated file
    model_bytes: int  # size of the trained folder's files
    stored_bytes: dict[str, int]  # weight data stored per sub-model; 0 = rebuilt from the base
    files_bytes: int  # the folder's other files and the weights files' headers, compressed
    # Relative Frobenius error of the fine-tuning change (|trained - rebuilt| / |trained - base|)
    # per sub-model and "overall"; 0 in lossless mode.
    errors: dict[str, float] = field(default_factory=dict)
    # The same error relative to the weights themselves (|trained - rebuilt| / |trained|).
    weight_errors: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        """A few lines for people: what was written, its size, and the error per sub-model."""
        mode = "lossless" if self.mode == LOSSLESS else f"low-rank, rank {self.rank}"
        share = self.file_bytes / self.model_bytes if self.model_bytes else 0.0
        lines = [f"Wrote {self.path} ({human_size(self.file_bytes)}, {mode}): "
                 f"{share:.1%} of the trained model's {human_size(self.model_bytes)}, "
                 f"in {self.seconds:.1f} s.",
                 f"  base model fingerprint {self.base_fingerprint}"]
        for sub, size in self.stored_bytes.items():
            line = f"  {sub or '.':14} {human_size(size):>10}"
            if size == 0:
                line += "  (unchanged: rebuilt from the base)"
            elif self.mode == LOWRANK:
                line += (f"  error {self.errors.get(sub, 0.0):.2%} of the change "
                         f"({self.weight_errors.get(sub, 0.0):.4%} of the weights)")
            lines.append(line)
        lines.append(f"  {'other files':14} {human_size(self.files_bytes):>10}  (configs, "
                     "tokenizer, parameters; compressed)")
        if self.mode == LOWRANK:
            lines.append(f"  Reconstruction error overall: {self.errors.get('overall', 0.0):.2%} "
                         f"of the fine-tuning change, {self.weight_errors.get('overall', 0.0):.4%}"
                         " of the weights (relative Frobenius norm).")
        return "\n".join(lines)


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


# ----------------------------------------------------------------------------- public API
def dehydrate(model_dir: str | os.PathLike, base: str | os.PathLike, out_file: str | os.PathLike,
              *, rank: int | None = None, overwrite: bool = False, progress: bool = True,
              device: str | None = None) -> DehydrateResult:
    """Write the trained diffusers folder ``model_dir`` as its difference from ``base``.

    ``base`` is what the model was trained from: a diffusers folder, a single file, a Hub id or
    ``tiny`` (anything :func:`colab_dreambooth.models.loading.resolve_model_folder` takes). Without
    ``rank`` the file is lossless; with ``rank`` matrix changes are stored as rank-``rank``
    factors (see the module docs). ``out_file`` is written atomically and never replaces an
    existing file unless ``overwrite``. ``device`` runs the SVDs (default: CUDA if available).
    """
    start = time.monotonic()
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise DehydrateError(f"rank must be a whole number of at least 1, got {rank!r}")
    model = trained_folder(model_dir)
    base_folder = resolve_model_folder(str(base))
    out = Path(out_file).expanduser()
    _check_out_file(out, model, base_folder, overwrite)
    files, weights = _scan_model_folder(model)
    layouts = {rel: _read_layout(model / rel) for rel in weights}
    for rel, layout in layouts.items():
        _refuse_token(layout.header, model / rel)

    log.info("Dehydrating %s against the base %s (%s) into %s", model, base, base_folder, out)
    base_weights = _BaseWeights(base_folder)
    try:
        base_of = {rel: _base_subfolder(rel, base_weights) for rel in weights}
        used = sorted({sub for sub in base_of.values() if sub is not None})
        fingerprint = base_weights.fingerprint(used, progress=progress)
        encoder = _Encoder(rank, torch.device(device) if device else _default_device())
        manifest: dict[str, Any] = {
            "format": FORMAT, "version": FORMAT_VERSION, "mode": LOWRANK if rank else LOSSLESS,
            "rank": rank, "base": {"name": str(base), "fingerprint": fingerprint,
                                   "subfolders": used},
            "files": [], "weights": []}
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = temp_file_beside(out)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            writer = _StreamingWriter(tmp, _header_reserve(layouts, files, str(base)))
            try:
                files_bytes = _store_files(writer, model, files, manifest)
                for rel in weights:
                    files_bytes += _store_weights(writer, model, rel, layouts[rel], base_of[rel],
                                                  base_weights, encoder, manifest, progress)
                manifest["model_bytes"] = sum((model / rel).stat().st_size
                                              for rel in files + weights)
                manifest["stored_bytes"] = encoder.stored_bytes
                manifest["errors"], manifest["weight_errors"] = encoder.errors()
                writer.finish({"format": "pt", "colab_dreambooth": FORMAT,
                               "manifest": json.dumps(manifest, separators=(",", ":"))})
            finally:
                writer.close()
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    finally:
        base_weights.close()
    return DehydrateResult(
        path=out, mode=manifest["mode"], rank=rank, base_fingerprint=fingerprint,
        file_bytes=out.stat().st_size, model_bytes=manifest["model_bytes"],
        stored_bytes=dict(encoder.stored_bytes), files_bytes=files_bytes,
        errors=manifest["errors"], weight_errors=manifest["weight_errors"],
        seconds=time.monotonic() - start)


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
    _verify_payload(file, info.payload_sha256, progress)
    base_folder = resolve_model_folder(str(base))
    out = Path(out_dir).expanduser()
    _check_out_dir(out, file, base_folder, overwrite)
    log.info("Rehydrating %s onto the base %s (%s) into %s", file, base, base_folder, out)
    base_weights = _BaseWeights(base_folder)
    fingerprint = base_weights.fingerprint(info.base_subfolders, progress=progress)
    if fingerprint != info.base_fingerprint:
        raise DehydrateError(
            f"{file} was made from the base model '{info.base_name}' with weights fingerprint "
            f"{info.base_fingerprint}, but {base} ({base_folder}) has fingerprint {fingerprint}. "
            "Rehydrate onto the exact base model it was dehydrated from (same weights, same "
            "dtype): the difference stored in the file only makes sense on top of that one.")
    written = [0]

    def write(folder: Path) -> None:
        with _TensorFile(file) as stored:
            for record in info.files:
                data = _unpack(stored, f"file::{record['path']}", file)
                if hashlib.sha256(data).hexdigest() != record["sha256"]:
                    raise DehydrateError(f"{file}: the stored {record['path']} is damaged "
                                         "(checksum mismatch); dehydrate the model again")
                target = folder / _safe_relpath(record["path"], file)
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


def read_info(file: str | os.PathLike) -> DehydratedInfo:
    """Read a dehydrated file's contents list; a clear :class:`DehydrateError` if it is not one."""
    from safetensors import SafetensorError, safe_open

    file = Path(file).expanduser()
    if not file.is_file():
        raise DehydrateError(f"dehydrated model file {file} not found")
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as exc:
        raise DehydrateError(f"{file} is not a readable dehydrated model: it is truncated or "
                             f"corrupt ({exc}). Copy it again, or dehydrate the model "
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


def base_fingerprint(base: str | os.PathLike, subfolders: Sequence[str] = ("text_encoder", "unet",
                                                                            "vae"),
                     *, progress: bool = False) -> str:
    """SHA-256 over name, dtype, shape and bytes of every tensor of the base's ``subfolders``.

    Independent of how the weights are split into files or ordered in them; any changed value,
    dtype or tensor changes it. Sub-folders the base lacks are skipped.
    """
    weights = _BaseWeights(resolve_model_folder(str(base)))
    try:
        return weights.fingerprint([s for s in subfolders if weights.index(s)], progress=progress)
    finally:
        weights.close()


def trained_folder(model_dir: str | os.PathLike) -> Path:
    """The trained diffusers folder: ``model_dir``, or its ``model/`` as ``train`` saves it."""
    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise DehydrateError(f"trained model folder {folder} not found")
    nested = folder / "model"
    if not (folder / "model_index.json").is_file() and (nested / "model_index.json").is_file():
        folder = nested  # the model's working folder, <models>/dreambooth/<name>
    if not (folder / "model_index.json").is_file():
        raise DehydrateError(f"{folder} is not a diffusers folder (no model_index.json): pass the "
                             "trained model's folder, <models root>/dreambooth/<name>/model")
    return folder


def human_size(n: int) -> str:
    """``1536`` -> ``1.5 KB`` (powers of 1000, as file managers and Colab show them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


# ----------------------------------------------------------------------------- input checks
def _check_out_file(out: Path, model: Path, base: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise DehydrateError(f"{out} is a folder: name the .safetensors file to write")
    if out.exists() and not overwrite:
        raise DehydrateError(f"{out} already exists: choose another name, or pass --overwrite "
                             "(overwrite=True) to replace it")
    for folder, what in ((model, "the trained model's"), (base, "the base model's")):
        if _inside(out, folder):
            raise DehydrateError(f"{out} is inside {what} folder {folder}: write it elsewhere, "
                                 "inputs are never modified")


def _check_out_dir(out: Path, file: Path, base: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DehydrateError(f"{out} exists and is not a folder: name a folder to write")
    if _inside(out, base) or _inside(base, out):
        raise DehydrateError(f"{out} overlaps the base model's folder {base}: rebuild the model "
                             "into a folder of its own")
    if _inside(file, out):
        raise DehydrateError(f"{file} is inside {out}, which would be replaced: rebuild into "
                             "another folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DehydrateError(f"{out} already exists and is not empty: choose another folder, or "
                             "pass --overwrite (overwrite=True) to replace it")


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _scan_model_folder(model: Path) -> tuple[list[str], list[str]]:
    """(other files, safetensors weights files) of the trained folder, relative POSIX paths."""
    files, weights = [], []
    for root, dirs, names in os.walk(model):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # temp/hidden folders
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(root) / name
            rel = path.relative_to(model).as_posix()
            suffix = path.suffix.lower()
            if suffix == ".safetensors":
                weights.append(rel)
            elif suffix in OTHER_WEIGHT_SUFFIXES:
                raise DehydrateError(
                    f"{path} holds weights in a format dehydrate does not read ({suffix}): "
                    "re-save the model with safetensors (diffusers' save_pretrained does by "
                    "default), or remove the file if it is a stray copy")
            else:
                files.append(rel)
    if not weights:
        raise DehydrateError(f"{model} holds no .safetensors weights: is it a trained model?")
    return files, weights


def _refuse_token(data: bytes, path: Path) -> None:
    # Checked on everything carried over verbatim; the token itself is never echoed.
    if TOKEN_PATTERN.search(data):
        raise DehydrateError(f"{path} seems to hold a Hugging Face token (hf_...): remove it "
                             "first; the dehydrated file would carry it to whoever gets the file")


def _safe_relpath(rel: str, file: Path) -> Path:
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or any(p in ("", ".", "..") for p in parts) \
            or "\\" in rel:
        raise DehydrateError(f"{file} names an unsafe path {rel!r}: it is damaged or forged")
    return Path(*parts)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- safetensors I/O
@dataclass
class _Layout:
    """A safetensors file's header, verbatim, and its tensors in data order."""

    header: bytes  # the 8-byte length and the JSON header, exactly as in the file
    tensors: list[tuple[str, dict]]  # (name, {"dtype", "shape", "data_offsets"}) by offset
    data_bytes: int

    @property
    def data_start(self) -> int:
        return len(self.header)


def _read_layout(path: Path) -> _Layout:
    """Parse and check a safetensors file's header (the data must cover the file exactly)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or n > _MAX_HEADER or n > size - 8:
            raise DehydrateError(f"{path} is not a safetensors file, or it is truncated")
        raw = head + f.read(n)
    layout = _parse_layout(raw, path)
    if layout.data_start + layout.data_bytes != size:
        raise DehydrateError(f"{path} is truncated or has trailing bytes "
                             f"({size} bytes, its header describes "
                             f"{layout.data_start + layout.data_bytes}); save the model again")
    return layout


def _parse_layout(raw: bytes, path: Path) -> _Layout:
    try:
        header = json.loads(raw[8:].decode("utf-8"))
        header.pop("__metadata__", None)
        tensors = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        end = 0
        for name, info in tensors:
            begin, stop = info["data_offsets"]
            dtype = _DTYPES[info["dtype"]]
            nbytes = math.prod(info["shape"]) * _element_size(dtype)
            if begin != end or stop - begin != nbytes:
                raise ValueError(f"tensor {name} is not where its header says")
            end = stop
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise DehydrateError(f"{path} has a damaged safetensors header ({exc})") from exc
    return _Layout(raw, tensors, end)


class _TensorFile:
    """Reads one tensor at a time from a safetensors file with positioned reads.

    Plain reads rather than a memory map: the working set stays one tensor, and the pages of a
    4 GB file do not pile up in the process's resident memory (Colab's RAM meter counts them).
    """

    def __init__(self, path: Path, layout: _Layout | None = None):
        self.path = path
        self.layout = layout or _read_layout(path)
        self.entries = dict(self.layout.tensors)
        self._file = open(path, "rb", buffering=0)

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (a KeyError if the file has none)."""
        info = self.entries[name]
        begin, end = info["data_offsets"]
        buffer = bytearray(end - begin)
        view, done = memoryview(buffer), 0
        self._file.seek(self.layout.data_start + begin)
        while done < len(buffer):
            got = self._file.readinto(view[done:])
            if not got:
                raise DehydrateError(f"{self.path} is truncated (tensor {name})")
            done += got
        dtype = _DTYPES[info["dtype"]]
        if not buffer:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "_TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _raw(tensor: torch.Tensor):
    """The tensor's bytes as a (zero-copy) numpy array, little-endian as safetensors stores them."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor reinterpreted as integers of its width: compares NaNs and -0.0 bit for bit."""
    return tensor.contiguous().view(_BITS[tensor.element_size()])


class _StreamingWriter:
    """Write a safetensors file one tensor at a time, data first, header last.

    The data goes behind ``reserve`` bytes kept for the header (the format allows the header to
    be padded with spaces); if the header outgrows them, or the padding would be more than a
    small share of the file, the data is moved once. A SHA-256 of the
    data is added to the metadata as ``payload_sha256``.
    """

    def __init__(self, path: Path, reserve: int):
        self.path = path
        self.reserve = -(-reserve // 8) * 8  # a multiple of 8 keeps the data 8-byte aligned
        self.file = open(path, "wb")
        self.file.seek(8 + self.reserve)
        self.entries: dict[str, dict] = {}
        self.offset = 0
        self.hash = hashlib.sha256()

    def add(self, name: str, tensor: torch.Tensor) -> int:
        """Append ``tensor`` as ``name``; return its size in bytes."""
        if name in self.entries:
            raise ValueError(f"duplicate tensor name {name}")
        data = _raw(tensor)
        self.file.write(data)
        self.hash.update(data)
        self.entries[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.offset, self.offset + data.nbytes]}
        self.offset += data.nbytes
        return data.nbytes

    def finish(self, metadata: dict[str, str]) -> None:
        """Write the header (with ``metadata``) and flush the file to disk."""
        metadata = {**metadata, "payload_sha256": self.hash.hexdigest()}
        header = json.dumps({"__metadata__": metadata, **self.entries},
                            separators=(",", ":")).encode("utf-8")
        slack = self.reserve - len(header)
        # A small file is moved rather than padded: the padding would be a big share of it.
        if 0 <= slack and (slack < 65536 or self.offset > 64 * slack):
            self.file.seek(0)
            self.file.write(struct.pack("<Q", self.reserve) + header
                            + b" " * (self.reserve - len(header)))
        else:
            self._move_data(header)
        self.file.flush()
        os.fsync(self.file.fileno())

    def _move_data(self, header: bytes) -> None:
        header += b" " * (-len(header) % 8)
        grown = self.path.with_name(self.path.name + ".grow")
        self.file.flush()
        with open(self.path, "rb") as src, open(grown, "wb") as dst:
            dst.write(struct.pack("<Q", len(header)) + header)
            src.seek(8 + self.reserve)
            shutil.copyfileobj(src, dst, _CHUNK)
        self.file.close()
        os.replace(grown, self.path)
        self.file = open(self.path, "r+b")

    def close(self) -> None:
        self.file.close()


def _header_reserve(layouts: dict[str, _Layout], files: list[str], base: str) -> int:
    """A generous upper bound of the dehydrated file's header size."""
    total = 65536 + 4 * len(base)
    for rel, layout in layouts.items():
        total += 6 * len(rel) + 600
        # Up to three parts per tensor, plus its kind in the (escaped) manifest.
        total += sum(3 * (len(rel) + 2 * len(name) + 140) + 2 * len(name) + 40
                     for name, _ in layout.tensors)
    return total + sum(8 * len(rel) + 600 for rel in files)


def _verify_payload(file: Path, expected: str, progress: bool) -> None:
    with open(file, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + n)
        digest = hashlib.sha256()
        with tqdm(total=file.stat().st_size - 8 - n, unit="B", unit_scale=True,
                  desc=f"check {file.name}", disable=not progress) as bar:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                bar.update(len(chunk))
    if digest.hexdigest() != expected:
        raise DehydrateError(f"{file} is corrupt: its data does not match its checksum. Copy it "
                             "again, or dehydrate the model again")


# ----------------------------------------------------------------------------- the base model
class _BaseWeights:
    """The base model's tensors, by sub-folder and name, read one at a time (memory-mapped)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._index: dict[str, dict[str, tuple[Path, dict, int]]] = {}
        self._open: dict[Path, _TensorFile] = {}

    def index(self, sub: str) -> dict[str, tuple[Path, dict, int]]:
        """{tensor name: (file, header entry, data start)} of sub-folder ``sub`` (may be empty)."""
        if sub not in self._index:
            entries: dict[str, tuple[Path, dict, int]] = {}
            for path in _model_weight_files(self.folder / sub) if sub else []:
                layout = _read_layout(path)
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
            self._open[path] = _TensorFile(path)
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
                            chunk = f.read(min(left, _CHUNK))
                            if not chunk:
                                raise DehydrateError(f"{path} is truncated")
                            digest.update(chunk)
                            left -= len(chunk)
                            bar.update(len(chunk))
        return "sha256:" + digest.hexdigest()

    def close(self) -> None:
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
        raise DehydrateError(f"the base model's {folder} holds no .safetensors weights (only "
                             "other formats): use a base saved with safetensors")
    return plain or files


def _base_subfolder(rel: str, base: _BaseWeights) -> str | None:
    parts = PurePosixPath(rel).parts
    if len(parts) < 2:
        return None
    for sub in (parts[0], BASE_SUBFOLDER_OF.get(parts[0])):
        if sub and base.index(sub):
            return sub
    return None


# ----------------------------------------------------------------------------- encoding
class _Encoder:
    """Chooses and builds what to store per tensor, and keeps the error and size totals."""

    def __init__(self, rank: int | None, device: torch.device):
        self.rank = rank
        self.device = device
        self.stored_bytes: dict[str, int] = {}
        self._sums: dict[str, list[float]] = {}  # sub -> [|t - rebuilt|^2, |t - b|^2, |t|^2]

    def encode(self, sub: str, t: torch.Tensor, b: torch.Tensor | None
               ) -> tuple[str, dict[str, torch.Tensor]]:
        """(kind, parts) for trained tensor ``t`` over base tensor ``b``."""
        kind, parts = _encode_exact(t, b)
        sums = self._sums.setdefault(sub, [0.0, 0.0, 0.0])
        if self.rank is None:
            return kind, parts
        comparable = b is not None and b.shape == t.shape and t.is_floating_point()
        if comparable:
            change = t.float() - b.float()
            sums[1] += _sq(change)
            sums[2] += _sq(t.float())
            if kind != "same" and t.ndim >= 2:
                factored = self._factor(t, b, change, _nbytes(parts))
                if factored is not None:
                    parts, rebuilt = factored
                    sums[0] += _sq(t.float() - rebuilt.float())
                    return "lowrank", parts
        elif t.is_floating_point():
            sums[2] += _sq(t.float())
        return kind, parts

    def _factor(self, t, b, change, exact_bytes: int):
        m = t.shape[0]
        n = t.numel() // m
        k = min(self.rank, m, n)
        factor_bytes = k * (m + n) * _element_size(FACTOR_DTYPE) + 4 * k
        if factor_bytes >= exact_bytes or not torch.isfinite(change).all():
            return None  # exact storage is no bigger (or the change is not finite): keep exact
        u, s, vh = _truncated_svd(change.reshape(m, n), k, self.device)
        parts = {"U": u.to(FACTOR_DTYPE), "S": s.float(), "Vh": vh.to(FACTOR_DTYPE)}
        return parts, _apply_lowrank(b, parts, t.shape, t.dtype)

    def add_stored(self, sub: str, nbytes: int) -> None:
        self.stored_bytes[sub] = self.stored_bytes.get(sub, 0) + nbytes

    def errors(self) -> tuple[dict[str, float], dict[str, float]]:
        """Relative errors of the change and of the weights, per sub-model and overall."""
        of_change, of_weights = {}, {}
        rows = dict(self._sums)
        rows["overall"] = [sum(v[i] for v in self._sums.values()) for i in range(3)]
        for sub, (err, change, weights) in rows.items():
            of_change[sub] = math.sqrt(err / change) if change else 0.0
            of_weights[sub] = math.sqrt(err / weights) if weights else 0.0
        return of_change, of_weights


def _encode_exact(t: torch.Tensor, b: torch.Tensor | None) -> tuple[str, dict[str, torch.Tensor]]:
    """Lossless: nothing, changed elements, a verified delta, or the trained tensor itself."""
    if b is None or b.shape != t.shape:
        return "full", {"full": t}
    bc = b.to(t.dtype)
    changed = _bits(t) != _bits(bc)
    count = int(changed.sum())
    if count == 0:
        return "same", {}
    index_dtype = torch.int32 if t.numel() < 2**31 else torch.int64
    if count * (t.element_size() + _element_size(index_dtype)) < t.numel() * t.element_size():
        index = changed.reshape(-1).nonzero().squeeze(1)
        return "sparse", {"index": index.to(index_dtype), "value": t.reshape(-1)[index]}
    if t.is_floating_point():
        delta = t - bc
        # Not every subtraction is undone by the addition (fp16 rounds often): verify each one.
        if torch.equal(_bits(bc + delta), _bits(t)):
            return "delta", {"delta": delta}
    return "full", {"full": t}


def _truncated_svd(matrix: torch.Tensor, k: int, device: torch.device):
    """The top ``k`` singular triplets ``U, S, Vh`` of ``matrix``, computed on ``device``.

    Through the eigenvectors of the small side's Gram matrix: several times faster than
    LAPACK's SVD on a 2-core CPU, and as exact for the top singular vectors (float32 resolves
    singular values down to ~1e-3 of the largest, far below what fp16 factors keep). The right
    factor is ``U^T x`` with its rows normalised, so ``U diag(S) Vh`` is the projection of the
    matrix on its top-``k`` singular subspace (at full rank, the matrix itself).
    """
    x = matrix.to(device=device, dtype=torch.float32)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    gram = x @ x.T
    with _one_cpu_thread(x.device):
        try:
            _, q = torch.linalg.eigh(gram)  # eigenvalues ascending
        except RuntimeError:  # float32 did not converge (rare): float64 does
            _, q = torch.linalg.eigh(gram.double())
    u = q[:, -k:].flip(1).float()
    w = u.T @ x
    s = torch.linalg.vector_norm(w, dim=1)
    vh = torch.where(s[:, None] > 0, w / s.clamp_min(torch.finfo(s.dtype).tiny)[:, None], 0.0)
    if tall:
        u, vh = vh.T, u.T
    return u.contiguous().cpu(), s.cpu(), vh.contiguous().cpu()


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run a CPU eigendecomposition on one thread.

    MKL's threaded eigh of a <=1280-wide matrix gains little on 2 cores and, when another
    process keeps a core busy, waits on its own threads: measured 1.5 s instead of 0.09 s per
    768-wide matrix, 19 instead of 5.4 minutes for SD 1.5 at rank 128.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _apply_lowrank(b: torch.Tensor, parts: dict[str, torch.Tensor], shape, dtype) -> torch.Tensor:
    """base + U diag(S) Vh, in float32, cast to the trained dtype (dehydrate measures this)."""
    change = (parts["U"].float() * parts["S"].float()) @ parts["Vh"].float()
    return (b.float() + change.reshape(shape)).to(dtype)


def _decode(kind: str, parts: dict[str, torch.Tensor], b: torch.Tensor | None, shape,
            dtype: torch.dtype) -> torch.Tensor:
    """Rebuild a trained tensor from what was stored and the base tensor."""
    if kind == "full":
        return parts["full"]
    if b is None:
        raise KeyError("the base tensor")
    if kind == "same":
        return b.to(dtype)
    if kind == "delta":
        return b.to(dtype) + parts["delta"]
    if kind == "sparse":
        t = b.to(dtype, copy=True).reshape(-1)
        t[parts["index"].long()] = parts["value"]
        return t.reshape(shape)
    if kind == "lowrank":
        return _apply_lowrank(b, parts, shape, dtype)
    raise KeyError(f"unknown kind {kind!r}")


_PARTS = {"full": ("full",), "same": (), "delta": ("delta",), "sparse": ("index", "value"),
          "lowrank": ("U", "S", "Vh")}


def _sq(x: torch.Tensor) -> float:
    """Squared Frobenius norm, summed in float64."""
    return float(torch.sum(x.square(), dtype=torch.float64))


def _nbytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in parts.values())


# ----------------------------------------------------------------------------- write / rebuild
def _store_files(writer: _StreamingWriter, model: Path, files: list[str],
                 manifest: dict) -> int:
    stored = 0
    for rel in files:
        data = (model / rel).read_bytes()
        _refuse_token(data, model / rel)
        packed = torch.frombuffer(bytearray(zlib.compress(data, 6)), dtype=torch.uint8)
        stored += writer.add(f"file::{rel}", packed)
        manifest["files"].append({"path": rel, "size": len(data),
                                  "sha256": hashlib.sha256(data).hexdigest()})
    return stored


def _store_weights(writer: _StreamingWriter, model: Path, rel: str, layout: _Layout,
                   base_sub: str | None, base: _BaseWeights, encoder: _Encoder, manifest: dict,
                   progress: bool) -> int:
    """Encode one weights file tensor by tensor; return the bytes of its stored header."""
    sub = PurePosixPath(rel).parts[0] if len(PurePosixPath(rel).parts) > 1 else ""
    encoder.add_stored(sub, 0)
    header = torch.frombuffer(bytearray(zlib.compress(layout.header, 6)), dtype=torch.uint8)
    header_bytes = writer.add(f"layout::{rel}", header)
    file_hash = hashlib.sha256(layout.header)  # the file's SHA-256, from the bytes read anyway
    kinds: dict[str, str] = {}
    with _TensorFile(model / rel, layout) as trained:
        for name, _ in tqdm(layout.tensors, desc=f"dehydrate {rel}", unit="tensor",
                            disable=not progress):
            t = trained.get(name)
            file_hash.update(_raw(t))
            kind, parts = encoder.encode(sub, t, base.get(base_sub, name))
            if kind != "same":
                kinds[name] = kind
            for part, tensor in parts.items():
                encoder.add_stored(sub, writer.add(f"{rel}::{name}::{part}", tensor))
            del t, parts
    manifest["weights"].append({"path": rel, "size": (model / rel).stat().st_size,
                                "sha256": file_hash.hexdigest(), "base_subfolder": base_sub,
                                "kinds": kinds})
    return header_bytes


def _unpack(stored: _TensorFile, key: str, file: Path) -> bytes:
    try:
        return zlib.decompress(_raw(stored.get(key)).tobytes())
    except (zlib.error, KeyError) as exc:
        raise DehydrateError(f"{file}: its copy of {key.split('::', 1)[1]} is missing or damaged "
                             f"({exc}); dehydrate the model again") from exc


def _rebuild_weights(stored: _TensorFile, file: Path, info: DehydratedInfo, record: dict,
                     base: _BaseWeights, folder: Path, progress: bool) -> int:
    """Write one weights file, tensor by tensor, with the trained file's own header."""
    rel = record["path"]
    layout = _parse_layout(_unpack(stored, f"layout::{rel}", file), file)
    target = folder / _safe_relpath(rel, file)
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(layout.header)
    kinds = record["kinds"]
    with open(target, "wb") as out:
        out.write(layout.header)
        for name, tinfo in tqdm(layout.tensors, desc=f"rehydrate {rel}", unit="tensor",
                                disable=not progress):
            dtype, shape = _DTYPES[tinfo["dtype"]], list(tinfo["shape"])
            kind = kinds.get(name, "same")
            try:
                parts = {p: stored.get(f"{rel}::{name}::{p}") for p in _PARTS[kind]}
                t = _decode(kind, parts, base.get(record["base_subfolder"], name), shape, dtype)
            except (KeyError, RuntimeError) as exc:  # a missing part or base tensor
                raise DehydrateError(f"{file}: cannot rebuild {rel} tensor {name} ({kind}): "
                                     f"{exc}. The file is damaged; dehydrate the model "
                                     "again") from exc
            if t.dtype != dtype or list(t.shape) != shape:
                raise DehydrateError(f"{file}: rebuilt {rel} tensor {name} has the wrong "
                                     "shape or dtype; the file is damaged")
            data = _raw(t)
            out.write(data)
            digest.update(data)
    if info.mode == LOSSLESS and digest.hexdigest() != record["sha256"]:
        raise DehydrateError(f"{file}: the rebuilt {rel} differs from the trained one (SHA-256 "
                             "mismatch), so the file or the base model is damaged; nothing was "
                             "written")
    return target.stat().st_size


__all__ = ["dehydrate", "rehydrate", "read_info", "base_fingerprint", "trained_folder",
           "human_size", "DehydrateError", "DehydrateResult",
           "RehydrateResult", "DehydratedInfo", "DEFAULT_RANK", "LOSSLESS", "LOWRANK"]
