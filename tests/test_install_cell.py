"""The notebooks' shared cells: badges generated from setup.cfg's repository URL, and the
install cell (one PACKAGE_SOURCE, nothing the runtime ships upgraded, bitsandbytes on CUDA, a
failure that says what to do). pip itself is the only thing faked (it would need the network);
tools/check_colab_install.py runs the real cell in the Colab replica (make venv-colab)."""

from __future__ import annotations

import configparser
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import check_colab_install  # noqa: E402
import notebook_cells  # noqa: E402

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "setup.cfg", encoding="utf-8")
    return parser


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_badge_and_install_cell_agree_with_setup_cfg(path):
    nb = nbformat.read(path, as_version=4)
    url = setup_cfg()["metadata"]["url"].strip()
    assert url.startswith("https://github.com/") and "OWNER" not in url
    expected = (f"(https://colab.research.google.com/github/"
                f"{url.removeprefix('https://github.com/')}/blob/main/notebooks/{path.name})")
    assert expected in nb.cells[0].source and notebook_cells.badge(path.name) in nb.cells[0].source
    install = next(c for c in nb.cells if c.cell_type == "code")
    assert install.source == notebook_cells.install_cell(), "run: make notebooks"
    assert 'PACKAGE_SOURCE = "colab-dreambooth"' in install.source
    assert "%pip" not in install.source and "OWNER" not in install.source


def test_notebook_extra_adds_nothing_the_runtimes_have():
    extras = setup_cfg()["options.extras_require"]
    notebook = [line.strip() for line in extras["notebook"].splitlines() if line.strip()]
    assert notebook == ["ipywidgets>=7.6"]  # Colab has 7.7.1, Kaggle 8.1.5
    requires = setup_cfg()["options"]["install_requires"]
    assert "ipython" not in requires.lower() and "ipywidgets" not in requires.lower()


class FakePip:
    """Stands in for ``python -m pip install``: records the call, reads the constraints."""

    def __init__(self, returncode: int = 0):
        self.returncode, self.calls, self.constraints = returncode, [], []

    def __call__(self, args, **kwargs):
        self.calls.append(args)
        self.constraints = Path(args[args.index("-c") + 1]).read_text().split()
        return subprocess.CompletedProcess(args, self.returncode, "out", "ERROR: no network")


def run_cell(monkeypatch, source: str, *, gpu: bool, pip: FakePip,
             installed_after: bool = True) -> dict:
    """Execute the install cell with PACKAGE_SOURCE = ``source`` on a fresh "runtime"."""
    real_find_spec = importlib.util.find_spec
    state = {"installed": False}

    def find_spec(name, *args):
        if name in ("colab_dreambooth", "widgets", "bitsandbytes"):
            return object() if state["installed"] and name != "bitsandbytes" else None
        return real_find_spec(name, *args)

    def fake_pip(args, **kwargs):
        result = pip(args, **kwargs)
        state["installed"] = result.returncode == 0 and installed_after
        return result

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(subprocess, "run", fake_pip)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi"
                        if gpu and name == "nvidia-smi" else None)
    code = notebook_cells.install_cell().replace('PACKAGE_SOURCE = "colab-dreambooth"',
                                                 f"PACKAGE_SOURCE = {source!r}")
    scope: dict = {}
    exec(compile(code, "install-cell", "exec"), scope)
    return scope


def test_install_cell_on_a_cuda_runtime_adds_bitsandbytes_and_pins_the_runtime(monkeypatch):
    from importlib.metadata import version

    kept = ("ipython", "ipykernel", "ipywidgets", "traitlets", "torch", "numpy", "transformers")
    now = {name: version(name) for name in kept}
    pip = FakePip()
    run_cell(monkeypatch, "colab-dreambooth", gpu=True, pip=pip)
    (args,) = pip.calls
    assert args[:4] == [sys.executable, "-m", "pip", "install"]
    assert args[-2:] == ["colab-dreambooth[notebook]", "bitsandbytes"]
    # What the kernel and torch are: pinned at the versions installed now.
    pinned = {c.split("==")[0].lower().replace("_", "-"): c.split("==")[1]
              for c in pip.constraints}
    assert {name: pinned[name] for name in kept} == now


def test_install_cell_without_a_gpu_and_with_other_sources(monkeypatch):
    for source, requirement in [
            ("git+https://github.com/me/colab-dreambooth@main",
             "colab-dreambooth[notebook] @ git+https://github.com/me/colab-dreambooth@main"),
            ("/content/wheels/colab_dreambooth-0.2.0-py3-none-any.whl",
             "/content/wheels/colab_dreambooth-0.2.0-py3-none-any.whl[notebook]"),
            ("./colab-dreambooth", "./colab-dreambooth[notebook]"),
            ("colab-dreambooth==0.2.0", "colab-dreambooth[notebook]==0.2.0")]:
        pip = FakePip()
        run_cell(monkeypatch, source, gpu=False, pip=pip)
        assert pip.calls[0][-1] == requirement


def test_a_failed_install_says_what_to_do(monkeypatch, capsys):
    with pytest.raises(RuntimeError, match="Internet on") as failure:
        run_cell(monkeypatch, "colab-dreambooth", gpu=False, pip=FakePip(returncode=1))
    assert "PACKAGE_SOURCE" in str(failure.value)
    assert "ERROR: no network" in capsys.readouterr().err  # pip's own words are shown
    with pytest.raises(RuntimeError, match="restart the runtime"):
        run_cell(monkeypatch, "colab-dreambooth", gpu=False, pip=FakePip(),
                 installed_after=False)


def test_an_importable_package_is_not_installed_again(monkeypatch):
    pip = FakePip()
    monkeypatch.setattr(subprocess, "run", pip)
    exec(compile(notebook_cells.install_cell(), "install-cell", "exec"), {})
    assert pip.calls == []  # this checkout is importable


def test_install_check_names_every_changed_version():
    before = {"ipython": "7.34.0", "torch": "2.11.0", "tqdm": "4.67.3"}
    after = {"ipython": "9.18.1", "torch": "2.11.0", "colab-dreambooth": "0.1.0"}
    assert check_colab_install.changed_versions(before, after) == [
        "ipython: 7.34.0 -> 9.18.1", "tqdm: 4.67.3 -> removed"]
    assert check_colab_install.changed_versions(before, dict(before, extra="1")) == []
    source = check_colab_install.install_cell_source(NOTEBOOKS[0], "/src/checkout")
    assert "PACKAGE_SOURCE = '/src/checkout'" in source and "colab-dreambooth\"\n" not in source
