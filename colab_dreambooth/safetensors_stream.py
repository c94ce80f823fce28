"""The ``.safetensors`` format, streamed: one writer and one reader that hold one tensor at a time.

A file is an 8-byte little-endian header size, a JSON header (each tensor's dtype, shape and
byte range in the data, plus an optional ``__metadata__`` dict of strings) and the tensors'
bytes. Writing and reading here never hold more than one tensor in memory, and reading uses
positioned reads rather than a memory map, so the pages of a 4 GB file do not pile up in the
process's resident memory (Colab's RAM meter counts them). Convert, export, dehydrate and the
training checkpoints all go through this module; nothing is ever unpickled.

This module is in the base layer: it imports nothing from the package but its errors.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from colab_dreambooth.errors import UserError

# The format's dtype names, the one table every reader and writer here uses.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
COPY_CHUNK = 16 * 1024 * 1024


class SafetensorsError(UserError, ValueError):
    """A file is not a readable ``.safetensors`` file; ``problem`` says what is wrong with it."""

    def __init__(self, path: Path, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{path} {problem}")


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, shape and dtype, known before its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Size of its data in bytes."""
        return math.prod(self.shape) * element_size(self.dtype)


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a (zero-copy when contiguous) numpy array, in the little-endian
    order safetensors stores them."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


# ==================================================================================== writing
class SafetensorsWriter:
    """Writes a ``.safetensors`` file one tensor at a time, data first and header last.

    The header lists every tensor's byte range, so it is written once the data is: into
    ``reserve`` bytes kept in front of the data (the format allows padding the header with
    spaces). If it outgrows them, or the padding would be a large share of a small file, the
    data is moved once.
    """

    def __init__(self, path: Path, reserve: int):
        if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
            raise RuntimeError("writing .safetensors needs a little-endian machine")
        self.path = path
        self.reserve = -(-reserve // 8) * 8  # a multiple of 8 keeps the data 8-byte aligned
        self.file = open(path, "wb")
        self.file.seek(8 + self.reserve)
        self.entries: dict[str, dict[str, Any]] = {}
        self.offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> int:
        """Append ``tensor`` as ``name``; return its size in bytes."""
        if name in self.entries:
            raise ValueError(f"duplicate tensor name {name}")
        data = tensor_bytes(tensor)
        self._write_data(data)
        self.entries[name] = _entry(tensor.dtype, tensor.shape, self.offset,
                                    self.offset + data.nbytes)
        self.offset += data.nbytes
        return data.nbytes

    def _write_data(self, data: np.ndarray) -> None:
        self.file.write(memoryview(data))

    def header_json(self, metadata: dict[str, str] | None) -> bytes:
        """The JSON header of what was added, with ``metadata``."""
        return _header_json(self.entries, metadata)

    def finish(self, metadata: dict[str, str] | None = None) -> None:
        """Write the header (with ``metadata``) in front of the data and flush it."""
        header = self.header_json(metadata)
        slack = self.reserve - len(header)
        # A small file is moved rather than padded: the padding would be a big share of it.
        if 0 <= slack and (slack < 65536 or self.offset > 64 * slack):
            self.file.seek(0)
            self.file.write(struct.pack("<Q", self.reserve) + header + b" " * slack)
        else:
            self._move_data(header)
        self.file.flush()

    def _move_data(self, header: bytes) -> None:
        header += b" " * (-len(header) % 8)
        grown = self.path.with_name(self.path.name + ".grow")
        self.file.flush()
        with open(self.path, "rb") as src, open(grown, "wb") as dst:
            dst.write(struct.pack("<Q", len(header)) + header)
            src.seek(8 + self.reserve)
            shutil.copyfileobj(src, dst, COPY_CHUNK)
        self.file.close()
        os.replace(grown, self.path)
        self.file = open(self.path, "r+b")

    def close(self) -> None:
        """Close the file (after :meth:`finish`, or to give up on it)."""
        self.file.close()


def _entry(dtype: torch.dtype, shape: Sequence[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [begin, end]}


def _header_json(entries: dict[str, dict[str, Any]], metadata: dict[str, str] | None) -> bytes:
    """The tensors, then ``metadata`` (left out when empty), as compact JSON."""
    header: dict[str, Any] = dict(entries)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    return json.dumps(header, separators=(",", ":")).encode("utf-8")


def write_safetensors(path: Path, specs: Sequence[TensorSpec],
                      produce: Callable[[TensorSpec], torch.Tensor],
                      metadata: dict[str, str] | None = None,
                      written: Callable[[int], None] | None = None) -> None:
    """Write a ``.safetensors`` file tensor by tensor: ``produce(spec)`` makes each one just
    before it is written, so only one tensor is in memory at a time. ``written(nbytes)`` is
    called after each tensor."""
    # The specs give the header's exact size up front, so it fills its room with no padding.
    planned, offset = {}, 0
    for spec in specs:
        planned[spec.name] = _entry(spec.dtype, spec.shape, offset, offset + spec.nbytes)
        offset += spec.nbytes
    writer = SafetensorsWriter(path, len(_header_json(planned, metadata)))
    try:
        for spec in specs:
            tensor = produce(spec)
            if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                raise RuntimeError(f"{spec.name}: made {tuple(tensor.shape)} {tensor.dtype}, "
                                   f"expected {spec.shape} {spec.dtype}")
            writer.add(spec.name, tensor)
            del tensor
            if written:
                written(spec.nbytes)
        writer.finish(metadata)
    finally:
        writer.close()


def write_sharded(folder: Path, stem: str, specs: Sequence[TensorSpec],
                  produce: Callable[[TensorSpec], torch.Tensor], max_shard_size: int,
                  written: Callable[[int], None] | None = None) -> list[Path]:
    """Write weights the way ``save_pretrained`` does: ``<stem>.safetensors``, or shards
    ``<stem>-00001-of-0000N.safetensors`` plus ``<stem>.safetensors.index.json``."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    if len(shards) == 1:
        names = [f"{stem}.safetensors"]
    else:
        names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_safetensors(folder / name, shard, produce, {"format": "pt"}, written)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {s.name: name for name, shard in zip(names, shards) for s in shard}}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2),
                                                               encoding="utf-8")
    return [folder / n for n in names]


# ==================================================================================== reading
@dataclass
class Layout:
    """A safetensors file's header, verbatim, and its tensors in data order."""

    header: bytes  # the 8-byte length and the JSON header, exactly as in the file
    tensors: list[tuple[str, dict]]  # (name, {"dtype", "shape", "data_offsets"}) by offset
    data_bytes: int
    metadata: dict[str, str]

    @property
    def data_start(self) -> int:
        """Where the data begins in the file: right after the header."""
        return len(self.header)


def read_layout(path: Path) -> Layout:
    """Parse and check a safetensors file's header (the data must cover the file exactly)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or n > MAX_HEADER or n > size - 8:
            raise SafetensorsError(path, "is not a safetensors file, or it is truncated")
        raw = head + f.read(n)
    layout = parse_layout(raw, path)
    if layout.data_start + layout.data_bytes != size:
        raise SafetensorsError(path, f"is truncated or has trailing bytes ({size} bytes, its "
                                     f"header describes {layout.data_start + layout.data_bytes})"
                                     "; save the model again")
    return layout


def parse_layout(raw: bytes, path: Path) -> Layout:
    """The layout of the header bytes ``raw`` (the 8-byte length included) of ``path``."""
    try:
        header = json.loads(raw[8:].decode("utf-8"))
        metadata = header.pop("__metadata__", None) or {}
        tensors = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        end = 0
        for name, info in tensors:
            begin, stop = info["data_offsets"]
            nbytes = math.prod(info["shape"]) * element_size(DTYPES[info["dtype"]])
            if begin != end or stop - begin != nbytes:
                raise ValueError(f"tensor {name} is not where its header says")
            end = stop
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SafetensorsError(path, f"has a damaged safetensors header ({exc})") from exc
    return Layout(raw, tensors, end, {str(k): str(v) for k, v in metadata.items()})


class SafetensorsReader:
    """Reads one tensor at a time from a safetensors file with positioned reads."""

    def __init__(self, path: Path, layout: Layout | None = None):
        self.path = path
        self.layout = layout or read_layout(path)
        self.entries = dict(self.layout.tensors)
        self._file = open(path, "rb", buffering=0)

    def keys(self) -> list[str]:
        """The tensors' names, in data order."""
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name``, from the header."""
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (a KeyError if the file has none), in memory of its own."""
        info = self.entries[name]
        begin, end = info["data_offsets"]
        buffer = bytearray(end - begin)
        view, done = memoryview(buffer), 0
        self._file.seek(self.layout.data_start + begin)
        while done < len(buffer):
            got = self._file.readinto(view[done:])
            if not got:
                raise SafetensorsError(self.path, f"is truncated (tensor {name})")
            done += got
        dtype = DTYPES[info["dtype"]]
        if not buffer:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["DTYPES", "DTYPE_NAMES", "SafetensorsError", "TensorSpec", "element_size",
           "tensor_bytes", "SafetensorsWriter", "write_safetensors", "write_sharded", "Layout",
           "read_layout", "parse_layout", "SafetensorsReader"]
