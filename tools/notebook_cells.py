"""The cells the four notebooks share, generated from ``setup.cfg``: the Open-in-Colab badge
(from ``[metadata] url``, the repository declared once) and the install cell (from
``[metadata] name``, the published name it installs by default).

``python tools/notebook_cells.py`` (``make notebooks``) rewrites them in ``notebooks/*.ipynb``;
``tests/test_install_cell.py`` checks that the notebooks agree with this file.
"""

from __future__ import annotations

import configparser
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
_BADGE_LINE = re.compile(r"^\[!\[Open In Colab\]\(.*\)\]\(.*\)$", re.M)

# The first code cell of every notebook. It runs before the package exists, so it is plain
# Python (no %pip: it also runs under nbclient, papermill and tools/check_colab_install.py).
INSTALL_CELL = '''\
# Install colab-dreambooth (skipped when it is already importable: a rerun, a local checkout).
# PACKAGE_SOURCE is where it comes from: its published name, or a git URL
#   "git+{url}",
# a wheel ("/content/drive/MyDrive/{wheel}") or a folder.
PACKAGE_SOURCE = "{name}"

import importlib.metadata, importlib.util, os, re, shutil, subprocess, sys, tempfile

# Colab's kernel breaks with another IPython/ipywidgets, and torch, numpy or transformers
# upgraded under a running kernel need a restart: pip may add packages, never change these.
KEEP_VERSIONS = {{"torch", "torchvision", "torchaudio", "numpy", "transformers", "ipython",
                 "ipykernel", "ipywidgets", "widgetsnbextension", "jupyterlab-widgets",
                 "traitlets", "jupyter-client", "jupyter-core", "notebook", "tornado", "pyzmq",
                 "psutil"}}


def pip_requirement(source: str, extras: str = "notebook") -> str:
    """``source`` with the extras: name[extras], name[extras] @ url, or path[extras]."""
    if "://" in source:
        return f"{name}[{{extras}}] @ {{source}}"
    if os.sep in source or source.endswith(".whl") or source.startswith("."):
        return f"{{source}}[{{extras}}]"
    name, rest = re.match(r"([A-Za-z0-9._-]+)(.*)", source).groups()
    return f"{{name}}[{{extras}}]{{rest}}"


def installed_version(name: str) -> str | None:
    """The version Python imports (the first on its path), None when not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_colab_dreambooth(source: str) -> None:
    """pip-install ``source`` keeping every KEEP_VERSIONS package at the runtime's version;
    bitsandbytes too on a CUDA runtime (the T4 preset's 8-bit Adam). Raises saying what to do."""
    if source.startswith("/content/drive/") and not os.path.isdir("/content/drive/MyDrive"):
        from google.colab import drive
        drive.mount("/content/drive")
    pins = [f"{{name}}=={{version}}" for name in sorted(KEEP_VERSIONS)
            if (version := installed_version(name))]
    packages = [pip_requirement(source)]
    if shutil.which("nvidia-smi") and importlib.util.find_spec("bitsandbytes") is None:
        packages.append("bitsandbytes")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as keep:
        keep.write("\\n".join(pins) + "\\n")
    print("Installing", ", ".join(packages), "...")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", keep.name,
                           *packages], capture_output=True, text=True)
    os.unlink(keep.name)
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\\n", file=sys.stderr)
        raise RuntimeError(
            f"Installing colab-dreambooth from {{source!r}} failed (pip's messages above). "
            "Check that the runtime reaches the internet (Kaggle: Settings > Internet on, which "
            "needs a phone-verified account) and that PACKAGE_SOURCE names a published version, "
            "a git URL, a wheel or a folder; then run this cell again.")
    importlib.invalidate_caches()
    if importlib.util.find_spec("colab_dreambooth") is None:
        raise RuntimeError("pip installed colab-dreambooth but Python cannot import it: restart "
                           "the runtime (Runtime > Restart session) and run this cell again.")
    print("Installed colab-dreambooth", installed_version("colab-dreambooth"))


if not all(importlib.util.find_spec(name) for name in ("colab_dreambooth", "widgets")):
    install_colab_dreambooth(PACKAGE_SOURCE)'''


def metadata() -> configparser.SectionProxy:
    """``setup.cfg``'s [metadata] section."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "setup.cfg", encoding="utf-8")
    return parser["metadata"]


def repository_url() -> str:
    """The repository's URL, declared once as ``url`` in setup.cfg (no trailing slash)."""
    return metadata()["url"].strip().rstrip("/")


def colab_url(notebook: str, branch: str = "main") -> str:
    """The address that opens ``notebooks/<notebook>`` of the repository in Colab."""
    path = repository_url().removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{path}/blob/{branch}/notebooks/{notebook}"


def badge(notebook: str) -> str:
    """The Markdown Open-in-Colab badge of ``notebook``."""
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(notebook)})"


def install_cell() -> str:
    """The install cell's source for this repository."""
    name = metadata()["name"].strip()
    version_wheel = f"{name.replace('-', '_')}-VERSION-py3-none-any.whl"
    return INSTALL_CELL.format(name=name, url=repository_url(), wheel=version_wheel)


def update(path: Path) -> bool:
    """Rewrite the badge and the install cell of one notebook; True when it changed."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    title = nb.cells[0]
    title.source = _BADGE_LINE.sub(badge(path.name).replace("\\", "\\\\"), title.source)
    install = next(c for c in nb.cells if c.cell_type == "code")
    install.source = install_cell()
    after = nbformat.writes(nb)
    if after != before:
        path.write_text(after + "\n", encoding="utf-8")
    return after != before


def main() -> None:
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        if update(path):
            print("updated", path.relative_to(REPO))


if __name__ == "__main__":
    sys.exit(main())
