"""Dehydrate / rehydrate: store a trained model as its difference from the base model.

:func:`dehydrate` turns a trained diffusers folder (as :func:`colab_dreambooth.training.train.train`
saves it) into one ``.safetensors`` file that holds only what differs from the base model it was
trained from; :func:`~colab_dreambooth.models.single_file.rehydrate.rehydrate` rebuilds the
folder from that file plus the same base model.

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

Everything works one tensor at a time (positioned reads, a streaming writer), so a 4 GB
model dehydrates and rehydrates in the 12.7 GB of RAM of a free Colab.

This module writes the file; :mod:`.rehydrate` rebuilds the folder, :mod:`.dehydrate_codec`
encodes each tensor, :mod:`.dehydrated_file` holds the file's format and checks, and
:mod:`.base_weights` reads and fingerprints the base model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from tqdm.auto import tqdm

from colab_dreambooth.files import temp_file_beside
from colab_dreambooth.models.loading import resolve_model_folder
from colab_dreambooth.models.low_rank import default_device
from colab_dreambooth.models.single_file.base_weights import (
    OTHER_WEIGHT_SUFFIXES,
    BaseWeights,
    base_subfolder,
)
from colab_dreambooth.models.single_file.dehydrate_codec import LOSSLESS, LOWRANK, TensorEncoder
from colab_dreambooth.models.single_file.dehydrated_file import (
    FORMAT,
    FORMAT_VERSION,
    DehydrateError,
    PayloadWriter,
    header_reserve,
    inside,
    refuse_token,
    safetensors_errors,
)
from colab_dreambooth.safetensors_stream import Layout, SafetensorsReader, read_layout, tensor_bytes

log = logging.getLogger(__name__)


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


@safetensors_errors()
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
    layouts = {rel: read_layout(model / rel) for rel in weights}
    for rel, layout in layouts.items():
        refuse_token(layout.header, model / rel)

    log.info("Dehydrating %s against the base %s (%s) into %s", model, base, base_folder, out)
    base_weights = BaseWeights(base_folder)
    try:
        base_of = {rel: base_subfolder(rel, base_weights) for rel in weights}
        used = sorted({sub for sub in base_of.values() if sub is not None})
        fingerprint = base_weights.fingerprint(used, progress=progress)
        encoder = TensorEncoder(rank, torch.device(device) if device else default_device())
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
            writer = PayloadWriter(tmp, header_reserve(layouts, files, str(base)))
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


def _check_out_file(out: Path, model: Path, base: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise DehydrateError(f"{out} is a folder: name the .safetensors file to write")
    if out.exists() and not overwrite:
        raise DehydrateError(f"{out} already exists: choose another name, or pass --overwrite "
                             "(overwrite=True) to replace it")
    for folder, what in ((model, "the trained model's"), (base, "the base model's")):
        if inside(out, folder):
            raise DehydrateError(f"{out} is inside {what} folder {folder}: write it elsewhere, "
                                 "inputs are never modified")


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


def _store_files(writer: PayloadWriter, model: Path, files: list[str],
                 manifest: dict) -> int:
    stored = 0
    for rel in files:
        data = (model / rel).read_bytes()
        refuse_token(data, model / rel)
        packed = torch.frombuffer(bytearray(zlib.compress(data, 6)), dtype=torch.uint8)
        stored += writer.add(f"file::{rel}", packed)
        manifest["files"].append({"path": rel, "size": len(data),
                                  "sha256": hashlib.sha256(data).hexdigest()})
    return stored


def _store_weights(writer: PayloadWriter, model: Path, rel: str, layout: Layout,
                   base_sub: str | None, base: BaseWeights, encoder: TensorEncoder, manifest: dict,
                   progress: bool) -> int:
    """Encode one weights file tensor by tensor; return the bytes of its stored header."""
    sub = PurePosixPath(rel).parts[0] if len(PurePosixPath(rel).parts) > 1 else ""
    encoder.add_stored(sub, 0)
    header = torch.frombuffer(bytearray(zlib.compress(layout.header, 6)), dtype=torch.uint8)
    header_bytes = writer.add(f"layout::{rel}", header)
    file_hash = hashlib.sha256(layout.header)  # the file's SHA-256, from the bytes read anyway
    kinds: dict[str, str] = {}
    with SafetensorsReader(model / rel, layout) as trained:
        for name, _ in tqdm(layout.tensors, desc=f"dehydrate {rel}", unit="tensor",
                            disable=not progress):
            t = trained.get(name)
            file_hash.update(tensor_bytes(t))
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


__all__ = ["dehydrate", "trained_folder", "human_size", "DehydrateResult"]
