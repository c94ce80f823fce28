"""Full training-state checkpoints: written whole or not at all, the last K kept, resumed exactly.

A checkpoint is a folder ``checkpoint-<step>`` holding everything the run needs to go on as if
it had never stopped: the trained weights in fp32 (safetensors), the optimizer, learning-rate
schedule and grad-scaler states, the EMA weights, every process's random-number states, and
``state.json`` (step, epoch, position in the epoch, seed, losses so far, the run's parameters).
It is written into a hidden temporary folder, flushed to the disk (on a Drive mount: handed
to Drive) and renamed into place, ``state.json`` last, so a kill at any moment leaves either
the previous checkpoints or the new one, never half of one; older checkpoints are deleted only
once the new one is complete. Tensors are written and read one at a time
(:mod:`colab_dreambooth.tensor_stream`), so saving and resuming never hold a whole model or
optimizer state in host memory. Loading never unpickles code: tensors come from safetensors,
the rest from JSON or ``torch.load(weights_only=True)``.

Where a run's checkpoints go and how a run finds the one to continue are
:mod:`colab_dreambooth.training.resume`'s.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from colab_dreambooth.config.fields import must_match_fields
from colab_dreambooth.config.params import params_to_dict
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.errors import UserError
from colab_dreambooth.files import fsync_file, fsync_folder, give_ordinary_permissions
from colab_dreambooth.models.lora import adapter_weights
from colab_dreambooth.runtime.storage import free_bytes, on_google_drive
from colab_dreambooth.tensor_stream import load_into, load_optimizer, save_optimizer, save_tensors

if TYPE_CHECKING:
    from colab_dreambooth.training.optim import EMA

log = logging.getLogger(__name__)

PREFIX = "checkpoint-"
STATE_FILE = "state.json"
# 2: the optimizer as optimizer.safetensors + optimizer.json (1: optimizer.pt, still read).
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
# Settings that change what a checkpoint's tensors or batches mean: resuming with another value
# cannot continue the same run. Everything else (steps, epochs, saving, sampling) may change.
MUST_MATCH = must_match_fields(DreamBoothConfig)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be written or used (with what to do about it)."""


@dataclass
class Progress:
    """Where a run stands: what a checkpoint records besides the tensors."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch the next batch belongs to
    batch_in_epoch: int = 0  # batches (per process) of that epoch already trained
    seed: int = 0
    total_steps: int = 0
    losses: list[float] = field(default_factory=list)


@dataclass
class TrainingState:
    """The live objects a checkpoint saves and restores (models unwrapped from accelerate)."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    optimizer: Any
    lr_scheduler: Any
    scaler: Any = None  # torch GradScaler under fp16, else None
    ema: "EMA | None" = None
    train_text_encoder: bool = False
    lora: bool = False

    def trained_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """The weights that training changes, per model (LoRA: only the adapters)."""
        out = {"unet": _trained_state(self.unet, self.lora)}
        if self.train_text_encoder:
            out["text_encoder"] = _trained_state(self.text_encoder, self.lora)
        return out


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


# ----------------------------------------------------------------------------- finding
def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest written first (a new run's step 100 is
    newer than an earlier run's step 800). A folder whose ``state.json`` is missing or
    unreadable, or whose files are not all there in full, is skipped."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for folder in root.glob(PREFIX + "*"):
        state = read_state(folder)
        if state is not None:
            found.append((float(state.get("saved_unix", 0.0)), state["progress"]["step"],
                          folder.name, folder))
    return [entry[-1] for entry in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_state(folder: Path) -> dict | None:
    """``state.json`` of a complete checkpoint, else None (half-written, damaged, foreign)."""
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        if state.get("format") not in READABLE_FORMATS:
            return None
        for name, size in state["files"].items():
            if (folder / name).stat().st_size != size:
                return None
        state["progress"]["step"] = int(state["progress"]["step"])
        return state
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


# ----------------------------------------------------------------------------- saving
def estimate_bytes(state: TrainingState) -> int:
    """About what a checkpoint of ``state`` takes on disk."""
    tensors = sum(t.numel() * t.element_size() for part in state.trained_tensors().values()
                  for t in part.values())
    optim = sum(v.numel() * v.element_size() for s in state.optimizer.state_dict()["state"]
                .values() for v in s.values() if torch.is_tensor(v))
    ema = sum(t.numel() * 4 for t in state.ema.shadow) if state.ema is not None else 0
    return tensors + optim + ema + (1 << 20)


def save_checkpoint(root: str | os.PathLike, state: TrainingState, progress: Progress,
                    config: "DreamBoothConfig", *, keep: int, accelerator=None) -> Path | None:
    """Write a checkpoint of ``state`` at ``progress`` under ``root``; keep the newest
    ``keep``. Every process must call it (each writes its random states); the main process
    writes the rest. Returns the folder, or None when the disk was too full (training goes on;
    older checkpoints are kept)."""
    root = Path(root)
    main = accelerator is None or accelerator.is_main_process
    rank = 0 if accelerator is None else accelerator.process_index
    # One temporary name for every process: the main process picks it, the others derive it.
    tmp = root / f".tmp-{checkpoint_name(progress.step)}"
    ok = True
    if main:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)
        needed = int(estimate_bytes(state) * 1.05)
        if free_bytes(root) < needed:
            # Older checkpoints beyond the ones we keep would go anyway: make room first. The
            # newest complete one stays until the new one is complete, whatever ``keep`` is.
            for gone in prune(root, keep=max(1, keep - 1)):
                log.warning("Deleted %s early to make room for the next checkpoint%s", gone,
                            DRIVE_BIN_NOTE if on_google_drive(root) else "")
        if free_bytes(root) < needed:
            log.warning("Not enough free space in %s for a checkpoint (%.2f GB needed, %.2f GB "
                        "free): this one is skipped, the previous one is kept, and training "
                        "goes on. Free some space or set Checkpoint folder elsewhere.%s", root,
                        needed / 1e9, free_bytes(root) / 1e9,
                        DRIVE_BIN_NOTE if on_google_drive(root) else "")
            ok = False
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
    ok = _all_agree(ok, accelerator)
    if not ok:
        return None
    _save_random_states(tmp / f"random_states_{rank}.pt")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if not main:
        if accelerator is not None:
            accelerator.wait_for_everyone()
        return root / checkpoint_name(progress.step)

    for part, tensors in state.trained_tensors().items():
        save_tensors(tmp / f"{part}.safetensors", tensors, torch.float32)
    save_optimizer(state.optimizer, tmp)
    torch.save(state.lr_scheduler.state_dict(), tmp / "scheduler.pt")
    if state.scaler is not None:
        torch.save(state.scaler.state_dict(), tmp / "scaler.pt")
    if state.ema is not None:
        save_tensors(tmp / "ema.safetensors", {str(i): t for i, t in enumerate(state.ema.shadow)})
    for path in tmp.iterdir():  # the small files and the other processes' random states
        fsync_file(path)
    files = {p.name: p.stat().st_size for p in tmp.iterdir()}
    record = {"format": FORMAT_VERSION, "progress": asdict(progress), "files": files,
              "ema_updates": state.ema.updates if state.ema is not None else None,
              "processes": 1 if accelerator is None else accelerator.num_processes,
              "params": params_to_dict(config),
              "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "saved_unix": time.time()}
    _write_json_synced(tmp / STATE_FILE, record)
    fsync_folder(tmp)
    target = root / checkpoint_name(progress.step)
    give_ordinary_permissions(tmp)
    swap_into_place(tmp, target)
    fsync_folder(root)
    # Only now, with the new one complete on the disk, may older ones go.
    gone = prune(root, keep=keep)
    if on_google_drive(root):
        log.info("Checkpoint at step %d is complete and flushed to Google Drive: %s%s",
                 progress.step, target, DRIVE_BIN_NOTE if gone else "")
    else:
        log.info("Checkpoint at step %d is complete and flushed to the disk: %s",
                 progress.step, target)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return target


DRIVE_BIN_NOTE = (" (files deleted on Google Drive go to its bin and still count against "
                  "the Drive quota until the bin is emptied: drive.google.com > Bin > Empty "
                  "bin)")


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints; return the deleted ones."""
    found = list_checkpoints(root)
    old = found[:max(0, len(found) - keep)]
    for folder in old:
        shutil.rmtree(folder, ignore_errors=True)
    return old


def _remove_stale(root: Path) -> None:
    """Temporary folders of writes that were killed, and damaged checkpoint folders."""
    for folder in root.glob(".tmp-" + PREFIX + "*"):
        shutil.rmtree(folder, ignore_errors=True)
    for folder in root.glob(".old-" + PREFIX + "*"):
        shutil.rmtree(folder, ignore_errors=True)


def swap_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; a ``target`` already there is replaced whole."""
    if target.exists():  # the same step saved again (a resumed run): replace it whole
        old = target.with_name(f".old-{target.name}-{uuid.uuid4().hex[:6]}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


def _write_json_synced(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _all_agree(ok: bool, accelerator) -> bool:
    """The main process's decision, seen by every process."""
    if accelerator is None or accelerator.num_processes == 1:
        return ok
    from accelerate.utils import broadcast_object_list

    box = [ok]
    broadcast_object_list(box, from_process=0)
    return bool(box[0])


def _trained_state(module: torch.nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    return adapter_weights(module) if lora else module.state_dict()


# ----------------------------------------------------------------------------- random states
def _save_random_states(path: Path) -> None:
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    states = {"python": [py_version, list(py_state), py_gauss],
              "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                        float(np_state[4])],
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(states, path)


def _load_random_states(path: Path) -> None:
    states = torch.load(path, weights_only=True)
    version, py_state, gauss = states["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ----------------------------------------------------------------------------- loading
def check_compatible(folder: Path, config: "DreamBoothConfig", num_processes: int = 1) -> dict:
    """The checkpoint's state, after checking that ``config`` can continue it."""
    state = read_state(folder)
    if state is None:
        raise CheckpointError(f"{folder} is not a complete checkpoint")
    saved, now = state["params"], params_to_dict(config)
    changed = [f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now"
               for k in MUST_MATCH if k in now and k in saved and saved.get(k) != now.get(k)]
    if state.get("processes", 1) != num_processes:
        changed.append(f"processes: {state.get('processes', 1)} in the checkpoint, "
                       f"{num_processes} now")
    if changed:
        raise CheckpointError(
            f"{folder} was made with other settings, so training cannot continue it exactly:\n"
            + "\n".join(f"  - {c}" for c in changed)
            + "\nSet them back, or start a new run (another model name or Checkpoint folder).")
    return state


def load_checkpoint(folder: Path, state: TrainingState, config: "DreamBoothConfig", *,
                    accelerator=None) -> Progress:
    """Restore ``state`` (in place) and every random state from ``folder``; return where the
    run stood."""
    record = check_compatible(folder, config,
                              1 if accelerator is None else accelerator.num_processes)
    # Every tensor is read alone and copied into place (on the GPU when training runs there):
    # host memory holds one tensor at a time, not the model or the optimizer state.
    for part, tensors in state.trained_tensors().items():
        missing = load_into(folder / f"{part}.safetensors", tensors)
        if missing:
            raise CheckpointError(f"{folder / (part + '.safetensors')} lacks {len(missing)} "
                                  f"tensors (e.g. {missing[0]}): it belongs to another model")
    if (folder / "optimizer.pt").is_file():  # format 1
        state.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True,
                                                   map_location="cpu"))
    else:
        load_optimizer(state.optimizer, folder)
    state.lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    if state.scaler is not None and (folder / "scaler.pt").is_file():
        state.scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
    if state.ema is not None:
        load_into(folder / "ema.safetensors", {str(i): t for i, t in enumerate(state.ema.shadow)})
        state.ema.updates = int(record.get("ema_updates") or 0)
    rank = 0 if accelerator is None else accelerator.process_index
    _load_random_states(folder / f"random_states_{rank}.pt")
    p = record["progress"]
    return Progress(step=p["step"], epoch=p["epoch"], batch_in_epoch=p["batch_in_epoch"],
                    seed=p["seed"], total_steps=p["total_steps"], losses=list(p["losses"]))


__all__ = ["CheckpointError", "MUST_MATCH", "Progress", "TrainingState", "check_compatible",
           "checkpoint_name", "estimate_bytes", "latest_checkpoint", "list_checkpoints",
           "load_checkpoint", "prune", "read_state", "save_checkpoint", "swap_into_place"]
