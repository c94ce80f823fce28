"""Where finished files and checkpoints go: a local or Drive folder, or a Hugging Face Hub repo.

A destination is a folder path (a mounted Google Drive folder is just a path) or
``hf://<user>/<repo>`` for a Hub model repo, created private unless told otherwise. The Hub token
comes from the caller, Colab's secrets (``HF_TOKEN``), the ``HF_TOKEN`` environment variable or a
``huggingface-cli login``; it is passed to the Hub client only and scrubbed from every message
(logs, exceptions), so it never reaches a notebook's output or a saved file.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from colab_dreambooth.errors import UserError
from colab_dreambooth.runtime.environment import mount_drive_if_needed
from colab_dreambooth.runtime.hub_token import find_token

log = logging.getLogger(__name__)

HUB_PREFIX = "hf://"


class StorageError(UserError, RuntimeError):
    """A copy or upload that did not succeed (its message never holds the token)."""


@dataclass(frozen=True)
class HubRepo:
    """A Hugging Face Hub model repo, ``hf://<user>/<repo>``."""

    repo_id: str

    def __str__(self) -> str:
        return HUB_PREFIX + self.repo_id

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}"


def parse_destination(destination: str | os.PathLike | None) -> Path | HubRepo | None:
    """A folder, a Hub repo (``hf://user/repo``) or None for a blank destination."""
    if destination is None:
        return None
    text = str(destination).strip()
    if not text:
        return None
    if text.startswith(HUB_PREFIX):
        repo_id = text[len(HUB_PREFIX):].strip("/")
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(parts) or any(" " in p for p in parts):
            raise StorageError(f"{text!r} is not a Hub repo: write hf://<user or org>/<repo name>")
        return HubRepo(repo_id)
    return Path(text).expanduser()


def hf_token(explicit: str | None = None) -> str | None:
    """The Hub token: ``explicit``, Kaggle's or Colab's ``HF_TOKEN`` secret (read once per
    session), the environment, or the token saved by ``huggingface-cli login``; None when
    there is none (:func:`colab_dreambooth.runtime.hub_token.find_token` says why)."""
    return find_token(explicit).token


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with every secret (and any ``hf_...`` token-shaped word) replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return re.sub(r"\bhf_[A-Za-z0-9]{20,}\b", "***", text)


def free_bytes(folder: str | os.PathLike) -> int:
    """Free bytes on the disk that holds ``folder`` (or its nearest existing parent)."""
    path = Path(folder).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


DRIVE_ROOT = Path("/content/drive")


def on_google_drive(path: str | os.PathLike) -> bool:
    """True when ``path`` lies on Colab's Google Drive mount (/content/drive), where deleted
    files go to the bin (still counting against the quota) and writes upload asynchronously."""
    try:
        resolved = Path(path).expanduser().absolute()
    except (OSError, RuntimeError):
        return False
    return resolved == DRIVE_ROOT or DRIVE_ROOT in resolved.parents


def folder_size(path: str | os.PathLike) -> int:
    """Bytes in a file, or in every file under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def copy_to_folder(path: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Copy a file or folder into ``folder`` atomically: it appears there whole or not at all
    (a previous copy of the same name is replaced only once the new one is complete)."""
    source, folder = Path(path), Path(folder).expanduser()
    mount_drive_if_needed(folder)  # never a folder under an unmounted /content/drive
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name
    if target.resolve() == source.resolve():
        return target
    needed = folder_size(source)
    if free_bytes(folder) < needed:
        raise StorageError(f"not enough free space in {folder} for {source.name} "
                           f"({needed / 1e9:.2f} GB): free some space or choose another folder")
    tmp = folder / f".{source.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if source.is_dir():
            shutil.copytree(source, tmp)
        else:
            shutil.copy2(source, tmp)
        if target.is_dir() and not target.is_symlink():
            old = folder / f".{source.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise StorageError(f"could not copy {source} to {folder}: {exc}") from None
    return target


def upload_to_hub(path: str | os.PathLike, repo: HubRepo, *, token: str | None = None,
                  private: bool = True, path_in_repo: str | None = None, retries: int = 3,
                  retry_delay: float = 5.0, message: str | None = None) -> str:
    """Upload a file or folder to ``repo`` (created, private by default, when missing), trying
    ``retries`` times with growing pauses. Returns the repo's URL."""
    from huggingface_hub import HfApi

    lookup = find_token(token)
    if not lookup.token:
        raise StorageError(lookup.problem)
    token = lookup.token
    source = Path(path)
    target = path_in_repo if path_in_repo is not None else source.name
    api = HfApi(token=token)

    def attempt() -> None:
        api.create_repo(repo.repo_id, private=private, exist_ok=True, repo_type="model")
        commit = message or f"Upload {source.name} with colab-dreambooth"
        if source.is_dir():
            api.upload_folder(folder_path=str(source), repo_id=repo.repo_id,
                              path_in_repo=target, commit_message=commit)
        else:
            api.upload_file(path_or_fileobj=str(source), repo_id=repo.repo_id,
                            path_in_repo=target, commit_message=commit)

    with_retries(attempt, f"upload of {source.name} to {repo}", retries, retry_delay, token)
    return repo.url


def delete_from_hub(repo: HubRepo, path_in_repo: str, *, token: str | None = None,
                    retries: int = 3, retry_delay: float = 5.0) -> None:
    """Delete a folder of ``repo`` (old checkpoints), retrying like uploads."""
    from huggingface_hub import HfApi

    token = hf_token(token)
    api = HfApi(token=token)
    with_retries(lambda: api.delete_folder(path_in_repo, repo_id=repo.repo_id,
                                           commit_message=f"Remove {path_in_repo}"),
                 f"removal of {path_in_repo} from {repo}", retries, retry_delay, token)


def with_retries(action: Callable[[], object], what: str, retries: int, delay: float,
                 token: str | None) -> None:
    """Run ``action`` up to ``retries`` times, pausing ``delay``, 2x``delay``... between tries;
    raise StorageError (with the token scrubbed) when every try failed."""
    for attempt in range(1, max(1, retries) + 1):
        try:
            action()
            return
        except Exception as exc:  # network, server, permission: all reported the same way
            reason = redact(f"{type(exc).__name__}: {exc}", token)
            if attempt >= retries:
                raise StorageError(f"{what} failed after {attempt} tries: {reason}") from None
            log.warning("%s failed (try %d of %d): %s; retrying", what, attempt, retries, reason)
            time.sleep(delay * 2 ** (attempt - 1))


def publish(path: str | os.PathLike, destination: str | os.PathLike | None, *,
            private: bool = True, token: str | None = None, retries: int = 3) -> str | None:
    """Send an exported file or a model folder to ``destination``: a folder (e.g. on Drive) or
    ``hf://<user>/<repo>``. Returns where it went (a path or the repo's URL); None when the
    destination is blank."""
    target = parse_destination(destination)
    if target is None:
        return None
    source = Path(path)
    if not source.exists():
        raise StorageError(f"{source} does not exist: export or train first")
    if isinstance(target, HubRepo):
        # A user pressing Send again may have just granted the notebook the secret.
        token = token or find_token(ask_again=True).token
        url = upload_to_hub(source, target, token=token, private=private, retries=retries)
        log.info("Uploaded %s to %s", source.name, url)
        return url
    copied = copy_to_folder(source, target)
    log.info("Copied %s to %s", source.name, copied)
    return str(copied)


@dataclass
class BackgroundUploader:
    """Uploads checkpoints to a Hub repo on one background thread, so training goes on while
    they travel. Each job is retried; a job that still fails is logged and kept in
    ``failures`` (training is never stopped by an upload)."""

    repo: HubRepo
    token: str | None = None
    private: bool = True
    retries: int = 3
    retry_delay: float = 5.0
    failures: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="hub-upload", daemon=True)
        self._thread.start()

    def upload(self, folder: Path, path_in_repo: str, *, then_delete: list[str] = ()) -> None:
        """Queue ``folder`` for upload as ``path_in_repo``; after it succeeds, delete the repo
        folders ``then_delete`` (older checkpoints beyond the ones kept)."""
        self._jobs.put((Path(folder), path_in_repo, list(then_delete)))

    def close(self, timeout: float | None = None) -> None:
        """Wait for queued uploads (at most ``timeout`` seconds), then stop the thread."""
        self._jobs.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("Hub uploads still running after %.0f s; they go on in the background",
                        timeout or 0)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            folder, path_in_repo, then_delete = job
            try:
                upload_to_hub(folder, self.repo, token=self.token, private=self.private,
                              path_in_repo=path_in_repo, retries=self.retries,
                              retry_delay=self.retry_delay,
                              message=f"Checkpoint {path_in_repo}")
                self.done.append(path_in_repo)
                log.info("Uploaded checkpoint %s to %s", path_in_repo, self.repo)
                for old in then_delete:
                    delete_from_hub(self.repo, old, token=self.token, retries=self.retries,
                                    retry_delay=self.retry_delay)
            except Exception as exc:
                message = redact(str(exc), hf_token(self.token))
                self.failures.append(message)
                log.warning("Checkpoint upload did not succeed (training goes on; the local "
                            "copy is kept): %s", message)


__all__ = ["HubRepo", "StorageError", "BackgroundUploader", "parse_destination", "hf_token",
           "redact", "free_bytes", "on_google_drive", "folder_size", "copy_to_folder", "upload_to_hub",
           "delete_from_hub", "publish"]
