"""Notebooks 01 and 03 run headless, unattended, on the tiny model, as papermill would run them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import nbformat
import nbclient
import ipykernel  # noqa: F401  (the kernel nbclient starts)

from colab_dreambooth.params import load_params  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"


def parameterize(nb, values: dict) -> None:
    """Add a cell after the ``parameters``-tagged one assigning ``values`` (papermill's way)."""
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)


def execute(name: str, values: dict, cwd: Path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    parameterize(nb, values)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def text_output(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") or out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


@pytest.mark.parametrize("name", ["01_prepare_data.ipynb", "03_train.ipynb"])
def test_notebook_is_committed_clean(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    assert "colab.research.google.com/github/" in nb.cells[0].source
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    params = tagged[0].source
    assert 'BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"' in params
    assert 'WORK_DIR = "/content/dreambooth"' in params and "UNATTENDED = False" in params
    installs = [c for c in code if "%pip install" in c.source]
    assert len(installs) == 1 and "except ImportError" in installs[0].source


def test_prepare_then_train_unattended(tmp_path, monkeypatch):
    work = tmp_path / "work"
    # The kernel imports the checkout (colab_dreambooth and widgets) even when not installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    common = {"BASE_MODEL": "tiny", "WORK_DIR": str(work), "UNATTENDED": True}

    prepared = execute("01_prepare_data.ipynb", {**common, "RESOLUTION": 64}, tmp_path)
    params = work / "params.json"
    assert params.is_file()
    config = load_params(params)
    assert config.pretrained_model_name_or_path == "tiny" and config.resolution == 64
    instance = Path(config.concepts_list[0].instance_data_dir)
    assert instance.parent.parent == work and len(list(instance.glob("*.png"))) == 6
    out = text_output(prepared)
    assert "drew the demo subject" in out and "No problem stops training" in out
    images = [o for c in prepared.cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the captioned grid and the crop preview

    trained = execute("03_train.ipynb", {**common, "STEPS": 3}, tmp_path)
    config = load_params(params)  # 03 saved what it trained
    assert config.max_train_steps == 3
    model = config.model_dir / "model"
    assert (model / "model_index.json").is_file()
    assert (model / "unet").is_dir() and (model / "text_encoder").is_dir()
    out = text_output(trained)
    assert "Finished 3 steps" in out and "finished step 3 of 3" in out
