"""The one streaming ``.safetensors`` writer and reader: files match the safetensors library's
both ways for every dtype of the shared table, and damaged files are named, not misread."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from colab_dreambooth.safetensors_stream import (
    DTYPES,
    SafetensorsError,
    SafetensorsReader,
    TensorSpec,
    read_layout,
    write_safetensors,
    write_sharded,
)


def _samples() -> dict[str, torch.Tensor]:
    """One small tensor per dtype of the table (and an empty one)."""
    base = torch.arange(-6, 6, dtype=torch.float32).reshape(3, 4) / 4
    out = {}
    for name, dtype in DTYPES.items():
        source = base > 0 if dtype == torch.bool else base * (1 if dtype.is_floating_point else 4)
        out[f"t_{name}"] = source.to(dtype)
    out["empty"] = torch.zeros(0, 5)
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so float8 and bool compare exactly too)."""
    return (a.dtype, a.shape) == (b.dtype, b.shape) and torch.equal(a.view(torch.uint8),
                                                                    b.view(torch.uint8))


def test_written_files_load_in_safetensors_and_back(tmp_path):
    tensors = _samples()
    path = tmp_path / "ours.safetensors"
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    write_safetensors(path, specs, lambda spec: tensors[spec.name], {"note": "x"})
    loaded = load_file(path)
    assert set(loaded) == set(tensors) and all(_same(loaded[k], v) for k, v in tensors.items())
    assert read_layout(path).metadata == {"note": "x"}
    theirs = tmp_path / "theirs.safetensors"
    save_file(tensors, theirs, metadata={"format": "pt"})
    with SafetensorsReader(theirs) as reader:
        assert sorted(reader.keys()) == sorted(tensors)
        assert all(_same(reader.get(k), v) for k, v in tensors.items())
        assert reader.shape("empty") == (0, 5)


def test_sharded_weights_have_an_index(tmp_path):
    tensors = {f"w{i}": torch.full((4, 4), float(i)) for i in range(5)}
    specs = [TensorSpec(k, (4, 4), torch.float32) for k in tensors]
    paths = write_sharded(tmp_path, "model", specs, lambda s: tensors[s.name], 2 * 64)
    assert len(paths) == 3
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 64
    for name, shard in index["weight_map"].items():
        assert torch.equal(load_file(tmp_path / shard)[name], tensors[name])


def test_damaged_files_are_named(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.ones(64)}, good)
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-10])
    with pytest.raises(SafetensorsError, match=r"cut\.safetensors is truncated"):
        read_layout(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(SafetensorsError, match=r"junk\.safetensors is not a safetensors file"):
        read_layout(junk)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:8] + b"[" + data[9:])
    with pytest.raises(SafetensorsError, match="damaged safetensors header"):
        read_layout(bad)
