"""The four notebooks run headless, unattended, in order, on the tiny model, in one fresh
WORK_DIR (each using what the one before left there), as papermill would run them."""

from __future__ import annotations

import os
from pathlib import Path

import ipykernel  # noqa: F401  (the kernel nbclient starts)
import nbclient
import nbformat
import pytest

from colab_dreambooth.config.params import load_params  # noqa: E402

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


NAMES = ["01_prepare_data.ipynb", "02_generate_class_images.ipynb", "03_train.ipynb",
         "04_test_and_export.ipynb"]


def test_the_four_notebooks_are_there():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_clean(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    # The badge and the install cell: tests/test_install_cell.py.
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    params = tagged[0].source
    assert 'BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"' in params
    assert 'WORK_DIR = ""' in params and "UNATTENDED = False" in params
    installs = [c for c in code if "PACKAGE_SOURCE =" in c.source]
    assert installs == [code[0]]


def test_all_four_notebooks_run_in_order_unattended(tmp_path, monkeypatch):
    work = tmp_path / "work"
    # The kernel imports the checkout (colab_dreambooth and widgets) even when not installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny matrices: threads only cost time
    common = {"BASE_MODEL": "tiny", "WORK_DIR": str(work), "UNATTENDED": True}
    params = work / "params.json"

    # 01: no photos, so the demo subject (6 images, 12 class images) is drawn.
    prepared = execute("01_prepare_data.ipynb", {**common, "RESOLUTION": 64}, tmp_path)
    assert params.is_file()
    config = load_params(params)
    assert config.pretrained_model_name_or_path == "tiny" and config.resolution == 64
    instance = Path(config.concepts_list[0].instance_data_dir)
    assert instance.parent.parent == work and len(list(instance.glob("*.png"))) == 6
    out = text_output(prepared)
    assert "drew the demo subject" in out and "No problem stops training" in out
    assert len(png_outputs(prepared)) >= 2  # the captioned grid and the crop preview

    # 02: two more class images than the demo drew, so two are generated (with captions).
    generated = execute("02_generate_class_images.ipynb",
                        {**common, "NUM_CLASS_IMAGES": 14, "CLASS_STEPS": 2}, tmp_path)
    config = load_params(params)  # 02 saved what it generated with
    concept = config.concepts_list[0]
    assert concept.num_class_images == 14 and concept.class_infer_steps == 2
    class_dir = config.class_dir(0)
    made = sorted(class_dir.glob("class-*.png"))
    assert len(made) == 2 and len(list(class_dir.glob("*.png"))) == 14
    assert all(p.with_suffix(".txt").is_file() for p in made)
    out = text_output(generated)
    assert "generated 2 class images" in out
    assert png_outputs(generated)  # the grid of the new class images

    # 03: trains on the instance images and the 14 class images.
    trained = execute("03_train.ipynb", {**common, "STEPS": 3}, tmp_path)
    config = load_params(params)  # 03 saved what it trained
    assert config.max_train_steps == 3 and config.concepts_list[0].num_class_images == 14
    model = config.model_dir / "model"
    assert (model / "model_index.json").is_file()
    assert (model / "unet").is_dir() and (model / "text_encoder").is_dir()
    out = text_output(trained)
    assert "Finished 3 steps" in out and "finished step 3 of 3" in out

    # 04: samples, export, card, dehydrate, and "send" to a folder (no network).
    published = work / "published"
    tested = execute("04_test_and_export.ipynb",
                     {**common, "N_SAMPLES": 1, "SAMPLE_STEPS": 2, "DEHYDRATE": True,
                      "DESTINATION": str(published)}, tmp_path)
    assert png_outputs(tested)  # the sample grid
    release = config.model_dir / "release"
    name = config.model_name
    assert (release / f"{name}.safetensors").stat().st_size > 0
    assert (release / f"{name}.dehydrated.safetensors").is_file()
    card = (release / "README.md").read_text(encoding="utf-8")
    assert "![Samples](samples.png)" in card and (release / "samples.png").is_file()
    sent = published / name
    assert (sent / f"{name}.safetensors").is_file() and (sent / "README.md").is_file()
    assert (sent / "model_index.json").is_file() and (sent / "unet").is_dir()
    out = text_output(tested)
    assert "Exported" in out and "Sent" in out and str(sent) in out


def png_outputs(nb) -> list:
    return [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]


def test_the_notebooks_train_and_export_an_sdxl_model(tmp_path, monkeypatch):
    """A user who picks an SDXL model in notebook 01 goes through 03 and 04 unchanged: the
    family comes from the base model (here the tiny SDXL-shaped one)."""
    work = tmp_path / "work"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    common = {"BASE_MODEL": "tiny-sdxl", "WORK_DIR": str(work), "UNATTENDED": True}
    execute("01_prepare_data.ipynb", {**common, "RESOLUTION": 64}, tmp_path)
    config = load_params(work / "params.json")
    assert config.pretrained_model_name_or_path == "tiny-sdxl"
    trained = execute("03_train.ipynb", {**common, "STEPS": 2}, tmp_path)
    assert "Finished 2 steps" in text_output(trained)
    model = load_params(work / "params.json").model_dir / "model"
    assert (model / "text_encoder_2").is_dir() and (model / "tokenizer_2").is_dir()
    tested = execute("04_test_and_export.ipynb",
                     {**common, "N_SAMPLES": 1, "SAMPLE_STEPS": 2}, tmp_path)
    assert png_outputs(tested)
    from colab_dreambooth.models.families import SDXL, file_family

    export = model.parent / "release" / f"{config.model_name}.safetensors"
    assert file_family(export) == SDXL
