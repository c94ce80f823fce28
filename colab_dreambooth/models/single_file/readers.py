"""Reading single-file models without running their code: ``.safetensors`` one tensor at a
time, ``.ckpt``/``.pt`` through ``torch.load(weights_only=True)`` with a short allow-list of
the training-state objects real SD files carry, and diffusers part folders (``unet/``...).

Everything here hands out tensors by name (:class:`TensorFile`); nothing converts them.
"""

from __future__ import annotations

import abc
import logging
import re
from pathlib import Path
from typing import Any

import torch

from colab_dreambooth.errors import ModelLoadError
from colab_dreambooth.safetensors_stream import (
    Layout,
    SafetensorsError,
    SafetensorsReader,
)

log = logging.getLogger(__name__)

# Release a source (drop its memory mapping) after this much reading, so resident memory stays
# small.
RELEASE_EVERY = 256 << 20


class ModelFileError(ModelLoadError):
    """A single-file model cannot be read, converted or written; the message names the file
    and what is wrong. (Not a training checkpoint: that one is
    :class:`colab_dreambooth.training.checkpoints.CheckpointError`.)"""


class TensorFile(abc.ABC):
    """A model file's tensors by name, read lazily; :meth:`release` frees what reading holds."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]
    global_step: int | None = None

    @abc.abstractmethod
    def get(self, key: str) -> torch.Tensor:
        """The tensor named ``key``."""

    def release(self) -> None:
        """Drop what reading holds (mapped pages, an open file); the next :meth:`get` opens
        the file again."""


class SafetensorsFile(TensorFile):
    """A ``.safetensors`` file, read one tensor at a time (no memory map to release)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            reader = SafetensorsReader(path)
        except (SafetensorsError, OSError) as exc:
            detail = exc.problem if isinstance(exc, SafetensorsError) else exc
            raise ModelFileError(f"{path} is not a readable .safetensors file ({detail}); it may "
                                 "be corrupt or an incomplete download: download it again") from exc
        self._layout: Layout = reader.layout
        self._reader: SafetensorsReader | None = reader
        self.shapes = {k: reader.shape(k) for k in sorted(reader.keys())}
        self.metadata = dict(reader.layout.metadata)

    def get(self, key: str) -> torch.Tensor:
        if self._reader is None:
            self._reader = SafetensorsReader(self.path, self._layout)
        return self._reader.get(key)

    def release(self) -> None:
        """Close the file; the next :meth:`get` opens it again."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None


class _Ignored:
    """Stands in for training-state objects (Lightning callbacks, numpy scalars) that some
    ``.ckpt`` files carry beside their weights: it keeps nothing and runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        pass


# Globals found in real SD training checkpoints outside ``state_dict``, all replaced by
# _Ignored (never imported or called), so the weights-only loader accepts such files.
_TRAINING_STATE_GLOBALS = [
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype",
]


class TorchFile(TensorFile):
    """A ``.ckpt``/``.pt`` file: ``torch.load(weights_only=True, mmap=True)``, ``state_dict``
    unwrapped. Re-loading after :meth:`release` costs only the unpickling of the names."""

    def __init__(self, path: Path):
        self.path = path
        self._mmap = True
        top = self._load()
        state = _unwrap_state_dict(top)
        if not isinstance(state, dict):
            raise ModelFileError(f"{path} holds no state dict of weights")
        self.shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
        meta = top.get("metadata") if isinstance(top, dict) else None
        self.metadata = ({str(k): str(v) for k, v in meta.items()}
                         if isinstance(meta, dict) else {})
        step = top.get("global_step") if isinstance(top, dict) else None
        self.global_step = int(step) if isinstance(step, (int, float)) else None
        # A file that cannot be memory-mapped was read whole: keep it rather than re-read it.
        self._state = state if not self._mmap else None

    def _load(self) -> Any:
        stand_ins = [(_Ignored, name) for name in _TRAINING_STATE_GLOBALS]
        try:
            with torch.serialization.safe_globals(stand_ins):
                try:
                    return torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:
                    if "mmap" not in str(exc) or not self._is_pickle():
                        raise
                    # Legacy (pre-zip) format: cannot be mapped, so it is read whole.
                    log.warning("%s is in the legacy .ckpt format: reading it whole into memory",
                                self.path)
                    self._mmap = False
                    return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
            raise ModelFileError(_torch_load_problem(self.path, exc)) from exc

    def _is_pickle(self) -> bool:
        with open(self.path, "rb") as f:
            return f.read(1) == b"\x80"  # the PROTO opcode that starts every binary pickle

    def get(self, key: str) -> torch.Tensor:
        if self._state is None:
            self._state = _unwrap_state_dict(self._load())
        return self._state[key]

    def release(self) -> None:
        if self._mmap:
            self._state = None


def _unwrap_state_dict(top: Any) -> Any:
    while isinstance(top, dict) and isinstance(top.get("state_dict"), dict):
        top = top["state_dict"]
    return top


def _torch_load_problem(path: Path, exc: Exception) -> str:
    text = str(exc).strip()
    if re.search(r"Unsupported (global|class)", text):
        found = re.findall(r"GLOBAL ([\w.]+)", text)
        return (f"{path} holds Python objects other than weights ({', '.join(found) or text}); "
                "it is not loaded with pickle for safety. Convert it to .safetensors with a tool "
                "you trust, or re-save only its state_dict")
    # torch's own advice (weights_only=False, re-save with zip) does not apply to a bad file.
    generic = not text or text.startswith("Weights only load failed") or "mmap" in text
    detail = "" if generic else f" ({text.split('. ')[0][:200]})"
    return (f"{path} could not be read as a PyTorch checkpoint{detail}: it is corrupt, "
            "truncated (an incomplete download?) or not a checkpoint")


def open_model_file(path: str | Path) -> TensorFile:
    """Open a single-file model by its content (a ``.ckpt`` that is really safetensors
    works too); raise :class:`ModelFileError` naming the file when it is unreadable."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelFileError(f"checkpoint file {path} not found")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        raise ModelFileError(f"{path} is empty or truncated ({path.stat().st_size} bytes)")
    # safetensors: an 8-byte little-endian header size, then the JSON header.
    if head[8:9] == b"{" or path.suffix.lower() == ".safetensors" and not head.startswith(b"PK"):
        return SafetensorsFile(path)
    return TorchFile(path)  # a zip (torch.save) or a legacy pickle


__all__ = ["ModelFileError", "TensorFile", "SafetensorsFile", "TorchFile", "open_model_file",
           "RELEASE_EVERY"]
