"""Temporary files and folders for atomic writes, with the permissions of ordinary files.

``tempfile.mkstemp``/``mkdtemp`` create private entries (0600/0700) so that no other user can
read a secret in a shared /tmp. Ours are written beside their target and renamed into place:
they become the user's exports, parameters and model folders, which must get the same
permissions as any file the user writes (0644/0755 with the usual umask), or other tools,
users of a shared machine and web servers cannot read them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def _umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """The mode ``mkdir`` would give a new folder."""
    return 0o777 & ~_umask()


def temp_file_beside(target: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """``(fd, name)`` of a new hidden file in ``target``'s folder, with ordinary permissions,
    to be renamed over ``target`` once written."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    if hasattr(os, "fchmod"):
        os.fchmod(fd, file_mode())
    return fd, name


def temp_folder_beside(target: Path) -> Path:
    """A new hidden folder in ``target``'s parent, with ordinary permissions, to be renamed
    to ``target`` once filled."""
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(folder, folder_mode())
    return folder


def copy_file_atomic(source: Path, target: Path) -> None:
    """Copy ``source`` to a hidden file beside ``target``, then rename it into place: a crash
    never leaves half a file under ``target``'s name."""
    fd, tmp = temp_file_beside(target)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def give_ordinary_permissions(folder: Path) -> None:
    """Set the usual modes on everything under ``folder`` before it is renamed into place:
    safetensors (0.8) writes every file 0600, whoever saves with it (diffusers included)."""
    files, folders = file_mode(), folder_mode()
    os.chmod(folder, folders)
    for root, dirs, names in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), folders)
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, files)


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a temporary file beside ``path``, then rename it over ``path``:
    a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_folder_atomic(write: Callable[[Path], object], target: Path) -> Path:
    """Call ``write(tmp_folder)``, then move the folder into place at ``target``.

    A crash during ``write`` leaves any earlier ``target`` untouched; the old folder is swapped
    out only once the new one is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder_beside(target)
    try:
        write(tmp)
        give_ordinary_permissions(tmp)
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# The image files training reads (lower case; a name's suffix is compared lower-cased).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def list_image_files(folder: str | Path) -> list[Path]:
    """Return the supported image files directly in `folder`, sorted by name.

    Hidden files (e.g. macOS ``._x.jpg``), captions and sub-folders such as
    ``.ipynb_checkpoints`` are skipped. Raises FileNotFoundError if it is missing.
    """
    return [p for p in visible_files(Path(folder)) if p.suffix.lower() in IMAGE_EXTENSIONS]


def visible_files(folder: Path) -> list[Path]:
    """The files directly in ``folder`` that are not hidden, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def cache_dir() -> Path:
    """This package's cache folder (``$COLAB_DREAMBOOTH_CACHE`` or ``~/.cache/colab_dreambooth``):
    the tiny model, the tiny captioners, the CLIP vocabulary."""
    return Path(os.environ.get("COLAB_DREAMBOOTH_CACHE",
                               Path.home() / ".cache" / "colab_dreambooth"))


def cached_folder(name: str, marker: str, build: Callable[[Path], object]) -> Path:
    """``cache_dir() / name``, written by ``build(folder)`` (atomically) the first time, that
    is while it lacks the file ``marker``."""
    target = cache_dir() / name
    if not (target / marker).is_file():
        save_folder_atomic(build, target)
    return target


__all__ = ["IMAGE_EXTENSIONS", "list_image_files", "visible_files", "copy_file_atomic",
           "write_text_atomic", "save_folder_atomic", "fsync_file", "fsync_folder", "file_mode",
           "folder_mode", "give_ordinary_permissions", "temp_file_beside", "temp_folder_beside",
           "cache_dir", "cached_folder"]
