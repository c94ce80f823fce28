"""Training state to and from disk one tensor at a time, so host memory never holds a whole
model or optimizer state: what keeps saving and resuming SD 1.5 within a free Colab's ~12.7 GB
of RAM.

Weights and optimizer state go to ``.safetensors`` files written tensor by tensor (each one
copied from the GPU just before it is written); the optimizer's non-tensor parts (step counts,
hyper-parameters) go to a small JSON file beside them. Loading reads one tensor at a time and
moves it straight to the device of the parameter it belongs to. Nothing is unpickled. The
format itself is :mod:`colab_dreambooth.safetensors_stream`'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from colab_dreambooth.files import fsync_file
from colab_dreambooth.safetensors_stream import SafetensorsReader, TensorSpec, write_safetensors

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
    with SafetensorsReader(path) as f:
        missing = sorted(set(targets) - set(f.keys()))
        if missing:
            return missing
        with torch.no_grad():
            for name, target in targets.items():
                target.copy_(f.get(name))
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
    record = json.loads((folder / f"{stem}.json").read_text(encoding="utf-8"))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with SafetensorsReader(folder / f"{stem}.safetensors") as f:

        def decode(value: Any, device: torch.device | None) -> Any:
            if isinstance(value, dict) and set(value) == {_TENSOR}:
                tensor = f.get(value[_TENSOR])
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


def _to_cpu(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.detach().to("cpu", dtype).contiguous()


__all__ = ["save_tensors", "load_into", "save_optimizer", "load_optimizer"]
