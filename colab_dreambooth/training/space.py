"""Disk space planned before training: the bytes a run will write to each destination,
compared with the free space there, so a run on a 15 GB Google Drive (or Kaggle's 20 GB
/kaggle/working) either fits or is refused before any GPU time is spent, with a way out.

Sizes come from the parameter counts of :mod:`colab_dreambooth.training.memory`: a checkpoint holds
the trained weights in fp32 plus the optimizer's states (8 bytes per weight for AdamW, 2 with
8-bit Adam) and the EMA copy; the model folder the UNet, text encoder and VAE in fp32; a LoRA
run's files are a few MB. On a mounted Drive, ``df`` reports the account's quota, and deleted
files go to the bin and keep counting, so there every checkpoint written counts, not only the
ones kept.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from colab_dreambooth.errors import ConfigError, Problem
from colab_dreambooth.files import IMAGE_EXTENSIONS
from colab_dreambooth.runtime.packages import INSTALL_HINT
from colab_dreambooth.runtime.storage import on_google_drive
from colab_dreambooth.training.checkpoints import list_checkpoints
from colab_dreambooth.training.memory import (
    OPTIMIZER_BYTES,
    ModelSizes,
    adapter_parameters,
    model_sizes,
)
from colab_dreambooth.training.resume import checkpoint_root

if TYPE_CHECKING:
    from colab_dreambooth.config.settings import DreamBoothConfig

GB = 1e9
KAGGLE_WORKING = Path("/kaggle/working")
KAGGLE_WORKING_CAP = 20 * GB  # what a Kaggle notebook may keep in /kaggle/working
# A generated PNG at 512 px is ~0.4 MB: about 0.5 of its raw RGB bytes.
PNG_BYTES_PER_PIXEL = 1.6
SLACK = 1.05  # file-system overhead and small files (state.json, random states, configs)


@dataclass(frozen=True)
class Write:
    """What one destination of the run will receive."""

    what: str  # "checkpoints", "model", ...
    folder: Path
    bytes: int  # how much more of the disk it takes at its peak
    how: str  # how that was counted


@dataclass
class Disk:
    """One file system (or Kaggle's capped /kaggle/working) and what the run writes to it."""

    folder: Path  # the first destination on it (its free space is queried there)
    free: int
    writes: list[Write] = field(default_factory=list)
    drive: bool = False
    kaggle_cap: bool = False

    @property
    def needed(self) -> int:
        return int(sum(w.bytes for w in self.writes) * SLACK)

    @property
    def fits(self) -> bool:
        return self.needed <= self.free


@dataclass
class SpacePlan:
    """Every destination of a run, grouped by the disk that holds it."""

    disks: list[Disk]
    notes: list[str] = field(default_factory=list)
    checkpoint_bytes: int = 0

    @property
    def fits(self) -> bool:
        return all(d.fits for d in self.disks)

    def __str__(self) -> str:
        lines = ["Disk space this run needs (estimated before training):"]
        for disk in self.disks:
            where = ("Google Drive" if disk.drive else
                     "/kaggle/working (20 GB cap)" if disk.kaggle_cap else str(disk.folder))
            lines.append(f"  {where}: {disk.needed / GB:.1f} GB needed, {disk.free / GB:.1f} GB "
                         f"free{'' if disk.fits else '  <- not enough'}")
            lines += [f"    {w.what:14} {w.bytes / GB:7.2f} GB  {w.folder}  ({w.how})"
                      for w in disk.writes]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class DiskSpaceError(ConfigError):
    """A run whose files will not fit where they go; the message names the ways out."""

    def __init__(self, plan: SpacePlan, choices: list[str]):
        self.plan = plan
        short = [d for d in plan.disks if not d.fits]
        problems = [Problem("disk", f"{_where(d)} needs {d.needed / GB:.1f} GB, "
                            f"{d.free / GB:.1f} GB free") for d in short]
        problems += [Problem("choice", c) for c in choices]
        super().__init__(problems)
        self.args = (
            "This run's files will not fit (estimated before training):\n"
            + "\n".join(f"  - {_where(d)}: {d.needed / GB:.1f} GB needed, "
                        f"{d.free / GB:.1f} GB free" for d in short)
            + "\n" + str(plan) + "\nWays out:\n" + "\n".join(f"  - {c}" for c in choices)
            + "\nOr start it anyway with force (train --force).",)


# ----------------------------------------------------------------------------- sizes
def trained_parameters(config: "DreamBoothConfig", sizes: ModelSizes) -> int:
    """The weights a checkpoint stores (LoRA: only the adapters)."""
    if config.use_lora:
        return adapter_parameters(config, sizes)
    return sizes.unet + (sizes.text_encoders if config.train_text_encoder else 0)


def checkpoint_bytes(config: "DreamBoothConfig", sizes: ModelSizes, *,
                     eight_bit: bool) -> int:
    """One checkpoint of ``config`` (blank fields already filled): the trained weights in
    fp32, the optimizer states and the EMA copy."""
    trained = trained_parameters(config, sizes)
    name = config.optimizer if config.optimizer in ("Lion", "Prodigy", "Adafactor") else "AdamW"
    lean = eight_bit and bool(config.use_8bit_adam) and not config.use_lora and name in (
        "AdamW", "Lion")
    per_weight = OPTIMIZER_BYTES[name.lower() + ("8bit" if lean else "")]
    if name == "Adafactor":  # factored second moments: a row and a column per matrix
        per_weight = 0.01
    if config.full_fp16 and not config.use_lora and not lean:
        per_weight /= 2
    ema = sizes.unet * 4 if config.use_ema and not config.use_lora else 0
    return int(trained * (4 + per_weight) + ema + (1 << 20))


def model_bytes(config: "DreamBoothConfig", sizes: ModelSizes) -> int:
    """The trained model: a diffusers folder in fp32 (with ``unet_ema``), or the LoRA file."""
    if config.use_lora:
        return trained_parameters(config, sizes) * 4 + (1 << 20)
    ema = sizes.unet * 4 if config.use_ema else 0
    return (sizes.unet + sizes.text_encoders + sizes.vae) * 4 + ema + (2 << 20)


def export_bytes(sizes: ModelSizes, *, fp16: bool = True) -> int:
    """One single-file export (notebook 04's release): UNet, text encoder and VAE."""
    return (sizes.unet + sizes.text_encoders + sizes.vae) * (2 if fp16 else 4)


def checkpoint_saves(config: "DreamBoothConfig", total_steps: int, steps_per_epoch: int) -> int:
    """How many checkpoints the run writes: every N steps and N epochs, and the last one."""
    saves = 1
    if config.save_every_steps:
        saves += (total_steps - 1) // config.save_every_steps
    if config.save_every_epochs and steps_per_epoch:
        epochs = math.ceil(total_steps / steps_per_epoch)
        saves += (epochs - 1) // config.save_every_epochs
    return saves


# ----------------------------------------------------------------------------- free space
def free_space(folder: str | os.PathLike, *, kaggle_working: Path = KAGGLE_WORKING) -> int:
    """Free bytes for new files in ``folder``: what ``df`` says for its disk (the account's
    quota on a mounted Google Drive), and under /kaggle/working no more than its 20 GB cap
    minus what it already holds."""
    path = _existing(Path(folder))
    free = shutil.disk_usage(path).free
    if _under(path, kaggle_working) and kaggle_working.is_dir():
        used = sum(p.stat().st_size for p in kaggle_working.rglob("*") if p.is_file())
        free = min(free, max(0, int(KAGGLE_WORKING_CAP) - used))
    return free


def _existing(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _where(disk: Disk) -> str:
    if disk.drive:
        return f"Google Drive ({disk.folder})"
    if disk.kaggle_cap:
        return "/kaggle/working (capped at 20 GB)"
    return str(disk.folder)


# ----------------------------------------------------------------------------- the plan
def plan_space(config: "DreamBoothConfig", *, total_steps: int, steps_per_epoch: int = 0,
               eight_bit: bool = False, sizes: ModelSizes | None = None,
               free: Callable[[Path], int] | None = None,
               kaggle_working: Path = KAGGLE_WORKING) -> SpacePlan:
    """What ``config`` (blank fields filled) will write where, grouped by disk, with each
    disk's free space from ``free(folder)`` (:func:`free_space` by default). ``eight_bit``: 8-bit optimizer states will
    really be used (bitsandbytes imports)."""

    sizes = sizes or model_sizes(config.base_model)
    free = free or free_space
    writes: list[Write] = []
    notes: list[str] = []
    one = checkpoint_bytes(config, sizes, eight_bit=eight_bit)
    root = checkpoint_root(config)
    saves = checkpoint_saves(config, total_steps, steps_per_epoch)
    existing = len(list_checkpoints(root))
    if on_google_drive(root):
        # Deleted checkpoints stay in Drive's bin and count until it is emptied.
        count = saves
        how = (f"{saves} checkpoint(s) of {one / GB:.2f} GB: on Drive each one counts, since "
               "replaced ones go to the bin")
        if saves > 1 and config.checkpoints_to_keep < saves:
            notes.append(f"Google Drive keeps deleted files in its bin, where they count against "
                         f"the quota until it is emptied: the {saves - config.checkpoints_to_keep}"
                         f" checkpoint(s) rotation replaces take {(saves - config.checkpoints_to_keep) * one / GB:.1f} GB "
                         "there (drive.google.com > Bin > Empty bin frees it)")
    else:
        # The new checkpoint is complete before the oldest is deleted: keep + 1 at the peak.
        count = max(1, min(saves, config.checkpoints_to_keep + 1 - existing))
        how = (f"{count} more checkpoint(s) of {one / GB:.2f} GB at the peak (a new one is "
               f"written before the oldest of the {config.checkpoints_to_keep} kept goes)")
    writes.append(Write("checkpoints", root, count * one, how))
    target = config.model_dir / ("lora" if config.use_lora else "model")
    writes.append(Write("LoRA file" if config.use_lora else "model", target,
                        model_bytes(config, sizes),
                        "adapters in fp32" if config.use_lora else
                        "UNet, text encoder and VAE in fp32" + (" + EMA" if config.use_ema
                                                                else "")))
    for index, concept in enumerate(config.concepts_list):
        if not concept.wants_prior_preservation:
            continue
        folder = config.class_dir(index)
        missing = max(0, concept.num_class_images - _count_images(folder))
        if missing:
            each = config.resolution ** 2 * PNG_BYTES_PER_PIXEL
            writes.append(Write("class images", folder, int(missing * each),
                                f"{missing} PNG(s) of ~{each / 1e6:.1f} MB"))
    previews = _preview_count(config, total_steps, steps_per_epoch)
    if previews:
        each = config.resolution ** 2 * PNG_BYTES_PER_PIXEL
        writes.append(Write("previews", config.model_dir / "samples", int(previews * each),
                            f"{previews} PNG(s) and grids"))
    if not config.use_lora:
        notes.append(f"after training, a single-file export (notebook 04) takes "
                     f"{export_bytes(sizes) / GB:.1f} GB more in fp16 under "
                     f"{config.model_dir / 'release'}")
    return SpacePlan(_group(writes, free, kaggle_working), notes, one)


def _group(writes: list[Write], free: Callable[[Path], int], kaggle_working: Path) -> list[Disk]:
    disks: dict[object, Disk] = {}
    for write in writes:
        path = _existing(write.folder)
        capped = _under(write.folder.expanduser().absolute(), kaggle_working)
        drive = on_google_drive(write.folder)  # the mount point itself may not exist yet
        key = (("kaggle", str(kaggle_working)) if capped else ("drive",) if drive
               else os.stat(path).st_dev)
        if key not in disks:
            disks[key] = Disk(write.folder, free(write.folder), drive=drive, kaggle_cap=capped)
        disks[key].writes.append(write)
    return list(disks.values())


def _count_images(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def _preview_count(config: "DreamBoothConfig", total_steps: int, steps_per_epoch: int) -> int:
    per_preview = sum(max(1, c.n_save_sample) for c in config.concepts_list) + 1  # + the grid
    count = 0
    if config.save_preview_every_steps:
        count += total_steps // config.save_preview_every_steps + 1
    if config.save_preview_every and steps_per_epoch:
        count += math.ceil(total_steps / steps_per_epoch) // config.save_preview_every + 1
    return count * per_preview


def run_length(config: "DreamBoothConfig") -> tuple[int, int]:
    """(total steps, steps per epoch) of ``config``, from Training Steps or from the number of
    instance images (counted by name, nothing decoded) and Training Epochs."""
    images = sum(_count_images(Path(c.instance_data_dir).expanduser())
                 for c in config.concepts_list if c.instance_data_dir.strip())
    batch = (config.train_batch_size or 1) * config.gradient_accumulation_steps
    per_epoch = max(1, math.ceil(max(images, 1) / batch))
    if config.max_train_steps:
        return config.max_train_steps, per_epoch
    return per_epoch * (config.num_train_epochs or 1), per_epoch


def check_space(config: "DreamBoothConfig", *, eight_bit: bool, bitsandbytes: bool,
                force: bool = False, log=None) -> SpacePlan:
    """Plan ``config``'s disk space (blank fields filled) and raise :class:`DiskSpaceError`
    naming the ways out when it does not fit (with ``force``: log a warning instead)."""
    total, per_epoch = run_length(config)
    plan = plan_space(config, total_steps=total, steps_per_epoch=per_epoch,
                      eight_bit=eight_bit)
    if log is not None:
        log.info("%s", plan)
    if not plan.fits:
        error = DiskSpaceError(plan, ways_out(config, plan, bitsandbytes=bitsandbytes))
        if not force:
            raise error
        if log is not None:
            log.warning("Forced: %s", error)
    return plan


def ways_out(config: "DreamBoothConfig", plan: SpacePlan, *, bitsandbytes: bool,
             sizes: ModelSizes | None = None) -> list[str]:
    """The choices that make a run's files fit, each with what it saves."""
    sizes = sizes or model_sizes(config.base_model)
    choices = []
    drive = any(d.drive and not d.fits for d in plan.disks)
    if drive:
        choices.append("keep checkpoints on the runtime's disk (Checkpoint folder blank or "
                       "under /content) and set Checkpoint Hub repo to hf://<user>/<repo>, so "
                       "they survive a disconnect without filling Drive")
        choices.append("empty Google Drive's bin (drive.google.com > Bin > Empty bin): "
                       "deleted files count against the quota until then")
        if config.save_every_steps:
            choices.append("save checkpoints less often (a larger Save checkpoint every N "
                           "steps): on Drive each one counts")
    for disk in plan.disks:
        ckpt = [w for w in disk.writes if w.what == "checkpoints"]
        if ckpt and not disk.fits and not disk.drive and disk.free >= plan.checkpoint_bytes * SLACK:
            choices.insert(0, f"{disk.folder} has room for one checkpoint "
                           f"({plan.checkpoint_bytes / GB:.1f} GB) but not for the next one "
                           "beside it: a new checkpoint is written whole before the previous "
                           "one is deleted, so that one always exists")
    if config.checkpoints_to_keep > 1:
        choices.append(f"set Checkpoints to keep to 1 (now {config.checkpoints_to_keep})")
    full = not config.use_lora
    if full and config.optimizer in ("AdamW", "Lion") and not config.use_8bit_adam or (
            full and config.use_8bit_adam and not bitsandbytes):
        lean = checkpoint_bytes(config.copy(use_8bit_adam=True), sizes, eight_bit=True)
        how = "turn on Use 8bit Adam" if bitsandbytes else (
            f"install bitsandbytes ({INSTALL_HINT}) for 8-bit optimizer states")
        choices.append(f"{how}: {lean / GB:.1f} GB a checkpoint instead of "
                       f"{plan.checkpoint_bytes / GB:.1f} GB")
    if full:
        lora = checkpoint_bytes(config.copy(use_lora=True), sizes, eight_bit=False)
        choices.append(f"turn on Use LORA: {lora / 1e6:.0f} MB a checkpoint, "
                       f"{model_bytes(config.copy(use_lora=True), sizes) / 1e6:.0f} MB the "
                       "trained file")
    choices.append("free some space, or point Models root / Checkpoint folder at a disk with "
                   "more room")
    return choices


__all__ = ["DiskSpaceError", "SpacePlan", "check_space", "checkpoint_bytes", "checkpoint_saves",
           "export_bytes", "free_space", "model_bytes", "plan_space", "run_length", "ways_out"]
