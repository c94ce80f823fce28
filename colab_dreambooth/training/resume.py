"""A run's checkpoints: where they go (a folder, a copy on the Hub), which one a resumed run
continues, and the :class:`Checkpointer` the training loop calls.

The checkpoint format itself (written whole or not at all, read back exactly) is
:mod:`colab_dreambooth.training.checkpoints`'.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from colab_dreambooth.runtime.hub_token import find_token
from colab_dreambooth.runtime.storage import (
    BackgroundUploader,
    HubRepo,
    hf_token,
    parse_destination,
    redact,
)
from colab_dreambooth.training.checkpoints import (
    MUST_MATCH,
    PREFIX,
    STATE_FILE,
    CheckpointError,
    Progress,
    TrainingState,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    read_state,
    save_checkpoint,
    swap_into_place,
)

if TYPE_CHECKING:
    from colab_dreambooth.config.settings import DreamBoothConfig

log = logging.getLogger(__name__)


def checkpoint_root(config: "DreamBoothConfig") -> Path:
    """The checkpoint folder: Checkpoint folder when set, else ``<model dir>/checkpoints``."""
    if config.checkpoint_dir.strip():
        return Path(config.checkpoint_dir).expanduser()
    return config.model_dir / "checkpoints"


# ----------------------------------------------------------------------------- resuming
def keep_checkpoint_choices(config: "DreamBoothConfig", folder: Path) -> "DreamBoothConfig":
    """``config`` with its blank (auto) fields that a checkpoint depends on set as the
    checkpoint's run had them, so a resume on another GPU (whose preset would choose another
    batch size, say) can continue it. Fields the user set stay theirs."""
    state = read_state(folder)
    if state is None:
        return config
    saved = state["params"]
    changes = {k: saved[k] for k in MUST_MATCH
               if hasattr(config, k) and getattr(config, k) is None and saved.get(k) is not None}
    if changes:
        log.info("Resume: keeping the interrupted run's %s",
                 ", ".join(f"{k}={v!r}" for k, v in changes.items()))
    return config.copy(**changes) if changes else config


def refuse_to_bury_unfinished_run(config: "DreamBoothConfig") -> None:
    """Raise when a new (not resumed) run would start beside an interrupted run's checkpoint:
    its next checkpoints would replace the only copy of hours of training. A finished run's
    checkpoints are replaced like its model folder, without asking."""
    root = checkpoint_root(config)
    latest = latest_checkpoint(root)
    state = read_state(latest) if latest is not None else None
    if state is None:
        return
    progress = state["progress"]
    if progress["step"] < progress["total_steps"]:
        raise CheckpointError(
            f"{latest} holds an interrupted run (step {progress['step']} of "
            f"{progress['total_steps']}, saved {state.get('saved_at', '')}). Continue it with "
            "resume (train --resume; notebook 03: RESUME = True), or, to start over, delete "
            f"{root} or choose another model name or Checkpoint folder.")


def saved_seed(folder: Path) -> int | None:
    """The seed a checkpoint's run used (a resumed run must use it again)."""
    state = read_state(folder)
    return None if state is None else int(state["progress"]["seed"])


# ----------------------------------------------------------------------------- the Hub
def hub_target(config: "DreamBoothConfig") -> HubRepo | None:
    """The Hub repo checkpoints are uploaded to, if any."""
    target = parse_destination(config.checkpoint_hub_repo)
    if target is not None and not isinstance(target, HubRepo):
        raise CheckpointError(f"Checkpoint Hub repo {config.checkpoint_hub_repo!r}: write "
                              "hf://<user>/<repo>, or put a folder into Checkpoint folder")
    return target


def download_latest_checkpoint(repo: HubRepo, root: Path, *, token: str | None = None
                               ) -> Path | None:
    """Fetch the newest complete checkpoint of ``repo`` (``checkpoints/checkpoint-*``) into
    ``root``; None when the repo holds none."""
    from huggingface_hub import HfApi, snapshot_download

    token = hf_token(token)
    try:
        files = HfApi(token=token).list_repo_files(repo.repo_id)
    except Exception as exc:
        raise CheckpointError(f"could not list {repo}: "
                              f"{redact(f'{type(exc).__name__}: {exc}', token)}") from None
    complete = sorted({f.split("/")[1] for f in files if f.startswith("checkpoints/" + PREFIX)
                       and f.endswith("/" + STATE_FILE)})
    if not complete:
        return None
    name = complete[-1]
    staging = root / f".download-{name}"
    try:
        snapshot_download(repo.repo_id, allow_patterns=[f"checkpoints/{name}/*"],
                          local_dir=staging, token=token)
    except Exception as exc:
        raise CheckpointError(f"could not download {name} from {repo}: "
                              f"{redact(f'{type(exc).__name__}: {exc}', token)}") from None
    root.mkdir(parents=True, exist_ok=True)
    swap_into_place(staging / "checkpoints" / name, root / name)
    shutil.rmtree(staging, ignore_errors=True)
    return root / name


# ----------------------------------------------------------------------------- during a run
def find_resume_checkpoint(config: "DreamBoothConfig") -> Path | None:
    """The newest complete local checkpoint; else the newest on Checkpoint Hub repo
    (downloaded); else None (the run starts from the beginning, with a warning)."""
    root = checkpoint_root(config)
    found = latest_checkpoint(root)
    repo = hub_target(config)
    if found is None and repo is not None:
        log.info("No checkpoint in %s: looking in %s", root, repo)
        found = download_latest_checkpoint(repo, root)
    if found is None:
        log.warning("Resume: no complete checkpoint in %s%s: starting from the beginning", root,
                    f" or {repo}" if repo else "")
    return found


class Checkpointer:
    """Writes checkpoints where the config says and hands them to the Hub uploader."""

    def __init__(self, config: "DreamBoothConfig", state: TrainingState, accelerator,
                 uploader: BackgroundUploader | None, batches_per_epoch: int):
        self.config, self.state, self.accelerator = config, state, accelerator
        self.uploader, self.batches_per_epoch = uploader, batches_per_epoch
        self.root = checkpoint_root(config)
        self.last: Path | None = None  # set by train() to the checkpoint it resumed from
        self.uploaded: list[str] = []

    def save(self, run: Progress) -> Path | None:
        """Checkpoint the run as it stands (every process calls it); None when skipped."""
        position = Progress(**vars(run))
        position.losses = list(run.losses)
        if position.batch_in_epoch >= self.batches_per_epoch:  # an epoch just ended
            position.epoch, position.batch_in_epoch = run.epoch + 1, 0
        if self.last is not None and self.last.name == checkpoint_name(run.step):
            return self.last  # this step is saved already (e.g. a stop right after a save)
        path = save_checkpoint(self.root, self.state, position, self.config,
                               keep=self.config.checkpoints_to_keep,
                               accelerator=self.accelerator)
        if path is not None:
            self.last = path
            if self.uploader is not None and self.accelerator.is_main_process:
                kept = {p.name for p in list_checkpoints(self.root)}
                gone = [name for name in self.uploaded if name not in kept]
                self.uploaded = [name for name in self.uploaded if name in kept] + [path.name]
                self.uploader.upload(path, f"checkpoints/{path.name}",
                                     then_delete=[f"checkpoints/{name}" for name in gone])
        return path


def hub_uploader(config: "DreamBoothConfig", accelerator) -> BackgroundUploader | None:
    """The background uploader of Checkpoint Hub repo (main process only), or None."""
    repo = hub_target(config)
    if repo is None or not accelerator.is_main_process:
        return None
    # Read here, on the caller's thread (Colab's access prompt belongs to the cell the user
    # runs), once per run: a failure earlier in the session may have been fixed since.
    lookup = find_token(ask_again=True)
    if not lookup.token:
        log.warning("Checkpoint Hub repo is %s but there is no Hugging Face token, so "
                    "checkpoints stay local only. %s", repo, lookup.problem)
    else:
        log.info("Checkpoints go to %s too (token from %s)", repo, lookup.source)
    return BackgroundUploader(repo, token=lookup.token, private=True)


__all__ = ["Checkpointer", "checkpoint_root", "download_latest_checkpoint", "find_resume_checkpoint",
           "hub_target", "hub_uploader", "keep_checkpoint_choices", "refuse_to_bury_unfinished_run",
           "saved_seed"]
