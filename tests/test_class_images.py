"""Class image generation on the real tiny model and real files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from colab_dreambooth import cli
from colab_dreambooth.config.concept import Concept
from colab_dreambooth.config.params import save_params
from colab_dreambooth.config.prompts import remove_token
from colab_dreambooth.data.dataset import DataError, collect_training_data
from colab_dreambooth.data.images import check_images
from colab_dreambooth.generation import class_images
from colab_dreambooth.generation.class_images import generate_class_images
from colab_dreambooth.models.loading import load_components

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_parts():
    """The tiny model's parts, loaded once and handed to every test's generator."""
    return load_components("tiny")


@pytest.fixture
def cached_loader(monkeypatch, tiny_parts):
    """Make generate_class_images reuse the module's loaded model (counts the loads)."""
    loads = []

    def load(name, vae=""):
        loads.append(name)
        return tiny_parts

    monkeypatch.setattr(class_images, "load_components", load)
    return loads


@pytest.fixture
def no_model(monkeypatch):
    def fail(name, vae=""):
        raise AssertionError(f"the model {name} was loaded")

    monkeypatch.setattr(class_images, "load_components", fail)


@pytest.fixture
def config(tiny_config, tmp_path):
    """One concept with a plain class prompt, 2-step generation at 64 px, its own class folder."""
    concept = tiny_config.concepts_list[0]
    concept.class_prompt = "a photo of a toy"
    concept.class_data_dir = str(tmp_path / "class")
    concept.num_class_images = 5
    concept.class_infer_steps = 2
    concept.class_seed = 100
    concept.class_negative_prompt = "blurry"
    return tiny_config.copy(resolution=64, sample_batch_size=1)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_fills_only_the_missing_count_and_keeps_existing_files(config, tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "class-00000.png")
    Image.new("RGB", (80, 64), "blue").save(folder / "class-00001.jpg")
    (folder / "class-00002.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # does not count
    before = {p.name: digest(p) for p in folder.iterdir()}

    # Through the real loader: 'tiny' goes through load_components.
    (report,) = generate_class_images(config, progress=False)

    assert (report.folder, report.wanted, report.existing, report.generated) == (folder, 5, 2, 3)
    assert {p.name: digest(folder / p.name) for p in map(Path, before)} == before
    new = [p.name for p in report.files]
    assert new == ["class-00003.png", "class-00004.png", "class-00005.png"]  # no name reused
    usable, _ = check_images(folder, 64)
    assert len(usable) == 5
    for path in report.files:
        assert path.with_suffix(".txt").read_text(encoding="utf-8").strip() == "a photo of a toy"
        with Image.open(path) as im:
            assert im.size == (64, 64)
            assert "Negative prompt: blurry" in im.text["parameters"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_rerun_on_a_complete_folder_generates_nothing_and_loads_no_model(
        config, cached_loader, monkeypatch):
    config.concepts_list[0].num_class_images = 2
    first = generate_class_images(config, progress=False)
    assert first[0].generated == 2 and cached_loader == ["tiny"]

    def fail(name, vae=""):
        raise AssertionError("the model was loaded for a complete folder")

    monkeypatch.setattr(class_images, "load_components", fail)
    (report,) = generate_class_images(config, progress=False)
    assert (report.existing, report.generated, report.files) == (2, 0, [])


def test_interrupted_run_continues_reproducibly_without_partial_files(
        config, cached_loader, monkeypatch, tmp_path):
    folder = tmp_path / "class"
    config.concepts_list[0].num_class_images = 3
    real_save = class_images._save_png
    calls = []

    def save_then_die(image, f, info):
        calls.append(1)
        if len(calls) == 2:  # the caption of image 2 is written, its PNG only half
            f.write(b"\x89PNG half")
            raise KeyboardInterrupt
        real_save(image, f, info)

    monkeypatch.setattr(class_images, "_save_png", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        generate_class_images(config, progress=False)
    assert visible(folder) == ["class-00000.png", "class-00000.txt"]

    monkeypatch.setattr(class_images, "_save_png", real_save)
    (folder / ".class-00007.png.cdb-tmp").write_bytes(b"left by a killed run")
    (report,) = generate_class_images(config, progress=False)
    assert (report.existing, report.generated) == (1, 2)
    assert len(check_images(folder, 64)[0]) == 3
    assert all(not p.name.startswith(".") for p in folder.iterdir())
    assert len(list(folder.glob("*.txt"))) == 3

    # The same seed gives the k-th image seed + k: identical to an uninterrupted run.
    reference = config.copy()
    reference.concepts_list[0].class_data_dir = str(tmp_path / "reference")
    (ref,) = generate_class_images(reference, progress=False)
    for k in range(3):
        name = f"class-{k:05d}.png"
        assert np.array_equal(pixels(folder / name), pixels(tmp_path / "reference" / name)), name
    assert not np.array_equal(pixels(folder / "class-00000.png"),
                              pixels(folder / "class-00001.png"))


def test_class_batch_size_sets_images_per_call(config, cached_loader, monkeypatch):
    batches = []
    real_pipeline = class_images._pipeline

    def counting_pipeline(cfg):
        pipe = real_pipeline(cfg)

        class Counting:
            def __call__(self, prompts, **kwargs):
                batches.append(len(prompts))
                assert len(kwargs["generator"]) == len(prompts)
                return pipe(prompts, **kwargs)

            def to(self, *args):
                return self

        return Counting()

    monkeypatch.setattr(class_images, "_pipeline", counting_pipeline)
    config.concepts_list[0].num_class_images = 3
    (report,) = generate_class_images(config.copy(sample_batch_size=2), progress=False)
    assert batches == [2, 1] and report.generated == 3


def test_filewords_class_prompt_takes_instance_captions_without_the_token(
        config, cached_loader, tmp_path):
    instance = tmp_path / "instance"
    instance.mkdir()
    for name, caption in (("a", "sks toy on the grass"), ("b", "a photo of SKS toy, snow")):
        Image.new("RGB", (64, 64), "green").save(instance / f"{name}.png")
        (instance / f"{name}.txt").write_text(caption, encoding="utf-8")
    concept = config.concepts_list[0]
    concept.instance_data_dir = str(instance)
    concept.instance_prompt = "[filewords]"
    concept.class_prompt = "a picture of [filewords]"
    concept.instance_token, concept.class_token = "sks", "toy"
    concept.file_prompt_contents = "Instance Token + Class Token + Description"
    concept.num_class_images = 3

    (report,) = generate_class_images(config, progress=False)

    captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in report.files]
    assert captions == ["toy on the grass", "a photo of toy, snow", "toy on the grass"]
    for path, caption in zip(report.files, captions):
        with Image.open(path) as im:
            assert im.text["parameters"].startswith(f"a picture of {caption}\n")
    # Training's [filewords] reads each caption back into the prompt it was generated from.
    data = collect_training_data(config)
    assert sorted(e.prompt for e in data.classes[0]) == sorted(
        f"a picture of {c}" for c in captions)


def test_blank_class_folder_goes_to_the_model_classifiers_folder(config, cached_loader,
                                                                  tmp_path):
    config.concepts_list[0].class_data_dir = ""
    config.concepts_list[0].num_class_images = 2
    second = Concept(instance_prompt="zwx toy", class_prompt="toy", num_class_images=1,
                     instance_data_dir=config.concepts_list[0].instance_data_dir,
                     class_infer_steps=2)
    untouched = Concept(instance_prompt="zwx toy", class_prompt="", num_class_images=4)
    config = config.copy(concepts_list=[config.concepts_list[0], second, untouched])

    reports = generate_class_images(config, progress=False)

    root = tmp_path / "dreambooth" / "test-model" / "classifiers"
    assert [(r.concept, r.folder, r.generated) for r in reports] == [
        (0, root / "concept_1", 2), (1, root / "concept_2", 1)]
    assert len(list((root / "concept_1").glob("*.png"))) == 2


def test_concepts_sharing_a_class_folder_fill_it_once(config, cached_loader):
    first = config.concepts_list[0]
    first.num_class_images = 2
    second = Concept(instance_prompt="zwx toy", class_prompt="a toy", num_class_images=3,
                     class_data_dir=first.class_data_dir, class_infer_steps=2)
    reports = generate_class_images(config.copy(concepts_list=[first, second]), progress=False)
    assert [(r.existing, r.generated) for r in reports] == [(0, 2), (2, 1)]
    assert len(list(Path(first.class_data_dir).glob("*.png"))) == 3


def test_filewords_without_instance_images_fails_before_loading(config, no_model, tmp_path):
    concept = config.concepts_list[0]
    concept.class_prompt = "[filewords]"
    concept.instance_data_dir = str(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="concept 1.*empty.*no usable image"):
        generate_class_images(config, progress=False)


def test_nothing_asked_loads_nothing(config, no_model):
    config.concepts_list[0].num_class_images = 0
    assert generate_class_images(config, progress=False) == []


@pytest.mark.parametrize("text, token, expected", [
    ("a photo of sks dog", "sks", "a photo of dog"),
    ("SKS dog, asks sks", "sks", "dog, asks"),
    ("sks , dog", "sks", "dog"),
    ("a zwx toy", "", "a zwx toy"),
    ("a big  zwx\tcat toy", "zwx cat", "a big toy"),
])
def test_remove_token(text, token, expected):
    assert remove_token(text, token) == expected


def test_cli_prints_what_it_wrote_where(config, cached_loader, tmp_path, capsys):
    config.concepts_list[0].num_class_images = 2
    params = save_params(config, tmp_path / "params.json")
    parser = cli.build_parser()
    args = parser.parse_args(["class-images", "--config", str(params), "--sample-batch-size",
                              "2", "--no-progress"])

    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "generated 2 class images" in out and str(tmp_path / "class") in out
    assert args.run(args) == 0
    assert "nothing to generate" in capsys.readouterr().out
    assert json.loads(params.read_text())["sample_batch_size"] == 1  # the file is not changed
