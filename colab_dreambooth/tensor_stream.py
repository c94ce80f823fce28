"""Tensors to and from disk one at a time, so host memory never holds a whole model or
optimizer state: what keeps saving and resuming SD 1.5 within a free Colab's ~12.7 GB of RAM.

Weights and optimizer state go to ``.safetensors`` files written tensor by tensor (each one
copied from the GPU just before it is written); the optimizer's non-tensor parts (step counts,
hyper-parameters) go to a small JSON file beside them. Loading reads one tensor at a time and
moves it straight to the device of the parameter it belongs to. Nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
              torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, shape and dtype, known before its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Size of its data in bytes."""
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def write_safetensors(path: Path, specs: Sequence[TensorSpec],
                      produce: Callable[[TensorSpec], torch.Tensor],
                      metadata: dict[str, str] | None = None,
                      written: Callable[[int], None] | None = None) -> None:
    """Write a ``.safetensors`` file tensor by tensor: ``produce(spec)`` makes each one just
    before it is written, so only one tensor is in memory at a time (the header is computed
    from the specs first). ``written(nbytes)`` is called after each tensor."""
    if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
        raise RuntimeError("writing .safetensors needs a little-endian machine")
    header: dict[str, Any] = {}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": _ST_DTYPES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format allows space padding; 8-byte alignment helps mmap
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for spec in specs:
            tensor = produce(spec)
            if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                raise RuntimeError(f"{spec.name}: made {tuple(tensor.shape)} {tensor.dtype}, "
                                   f"expected {spec.shape} {spec.dtype}")
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(data.numpy()))
            del tensor, data
            if written:
                written(spec.nbytes)


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


_TENSOR = "__tensor__"  # marks a tensor's place in the optimizer's JSON


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor],
                 dtype: torch.dtype | None = None) -> None:
    """Write ``tensors`` (on any device) to ``path``, each cast to ``dtype`` when given, one
    at a time, then flush the file to the disk."""
    specs = [TensorSpec(name, tuple(t.shape), dtype or t.dtype) for name, t in tensors.items()]
    write_safetensors(path, specs, lambda spec: _to_cpu(tensors[spec.name], spec.dtype))
    fsync_file(path)


def load_into(path: Path, targets: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy each tensor of ``path`` into the tensor of the same name in ``targets`` (on its
    device and dtype), one at a time. Returns the names ``targets`` has and the file lacks
    (nothing is copied then)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        missing = sorted(set(targets) - set(f.keys()))
        if missing:
            return missing
        with torch.no_grad():
            for name, target in targets.items():
                target.copy_(f.get_tensor(name))
    return []


def save_optimizer(optimizer: Any, folder: Path, stem: str = "optimizer") -> None:
    """Write ``optimizer.state_dict()`` as ``<stem>.safetensors`` (every tensor, streamed from
    its device) and ``<stem>.json`` (the rest, with each tensor's name in its place)."""
    tensors: dict[str, torch.Tensor] = {}
    state_dict = optimizer.state_dict()

    def encode(value: Any, name: str) -> Any:
        if torch.is_tensor(value):
            tensors[name] = value
            return {_TENSOR: name}
        if isinstance(value, Mapping):
            return {str(k): encode(v, f"{name}.{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [encode(v, f"{name}.{i}") for i, v in enumerate(value)]
        return value

    record = {"state": [[index, encode(entry, f"state.{index}")]
                        for index, entry in state_dict["state"].items()],
              "param_groups": [encode(group, f"group.{i}")
                               for i, group in enumerate(state_dict["param_groups"])]}
    save_tensors(folder / f"{stem}.safetensors", tensors)
    text = json.dumps(record)
    with open(folder / f"{stem}.json", "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def load_optimizer(optimizer: Any, folder: Path, stem: str = "optimizer") -> None:
    """Restore what :func:`save_optimizer` wrote into ``optimizer``. Each state tensor is read
    alone and moved to its parameter's device before the next is read (0-dim ones, such as
    torch's step counts, stay on the CPU where torch keeps them), so host memory holds one
    tensor at a time when training runs on a GPU."""
    from safetensors import safe_open

    record = json.loads((folder / f"{stem}.json").read_text(encoding="utf-8"))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with safe_open(str(folder / f"{stem}.safetensors"), framework="pt", device="cpu") as f:

        def decode(value: Any, device: torch.device | None) -> Any:
            if isinstance(value, dict) and set(value) == {_TENSOR}:
                tensor = f.get_tensor(value[_TENSOR])
                return tensor.to(device) if device is not None and tensor.dim() else tensor
            if isinstance(value, dict):
                return {k: decode(v, device) for k, v in value.items()}
            if isinstance(value, list):
                return [decode(v, device) for v in value]
            return value

        state = {}
        for index, entry in record["state"]:
            device = params[index].device if index < len(params) else None
            state[index] = decode(entry, device)
        groups = [decode(group, None) for group in record["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def fsync_file(path: Path) -> None:
    """Make the kernel hand ``path``'s data to the disk (on a Drive mount: to Drive's
    uploader) before we go on; a runtime that vanishes later keeps it."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename into it), where the OS allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (FUSE mounts) refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _to_cpu(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.detach().to("cpu", dtype).contiguous()


__all__ = ["save_tensors", "load_into", "save_optimizer", "load_optimizer", "fsync_file",
           "fsync_folder"]
