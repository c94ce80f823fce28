"""Sampling a model: seeds, prompts from the concept fields, files, grid and command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from colab_dreambooth import cli
from colab_dreambooth.config.prompts import PromptError
from colab_dreambooth.data.dataset import collect_training_data
from colab_dreambooth.errors import ModelLoadError
from colab_dreambooth.generation import sample
from colab_dreambooth.generation.sample import (
    SampleJob,
    concept_sample_jobs,
    generate_samples,
    image_grid,
    run_samples,
    sample_concepts,
    save_images,
)
from colab_dreambooth.models.pipelines import load_pipeline, resolve_model
from colab_dreambooth.models.tiny import tiny_model_path

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(tiny_model_path(), device="cpu")


@pytest.fixture
def config(tiny_config):
    """The demo concept ('[filewords]' prompts, token zwx) sampling 2 images in 2 steps."""
    concept = tiny_config.concepts_list[0]
    concept.save_sample_prompt = ""
    concept.n_save_sample = 2
    concept.sample_seed = 11
    concept.save_infer_steps = 2
    concept.save_sample_negative_prompt = "blurry"
    concept.save_guidance_scale = 5.0
    return tiny_config


def array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_pipeline_loads_in_the_dtype_asked_on_this_diffusers():
    """diffusers 0.39 (Colab's) reads torch_dtype and ignores dtype; 0.40+ reads dtype."""
    import torch

    half = load_pipeline(tiny_model_path(), device="cpu", dtype=torch.float16)
    assert {half.unet.dtype, half.vae.dtype, half.text_encoder.dtype} == {torch.float16}


def test_same_seed_gives_the_same_pixels(pipe):
    a = generate_samples(pipe, "a photo of zwx toy", n=2, seed=3, steps=2, height=64, width=64,
                         progress=False)
    b = generate_samples(pipe, "a photo of zwx toy", n=2, seed=3, steps=2, height=64, width=64,
                         progress=False)
    c = generate_samples(pipe, "a photo of zwx toy", n=1, seed=4, steps=2, height=64, width=64,
                         progress=False)
    assert [im.size for im in a] == [(64, 64)] * 2
    assert all(np.array_equal(array(x), array(y)) for x, y in zip(a, b))
    assert np.array_equal(array(a[1]), array(c[0]))  # image i uses seed + i
    assert not np.array_equal(array(a[0]), array(a[1]))


def test_blank_sample_prompt_uses_the_instance_prompts_built_as_in_training(config):
    jobs = concept_sample_jobs(config, 0)
    built = [e.prompt for e in collect_training_data(config).instance]
    assert [j.prompt for j in jobs] == built[:2]
    assert all("zwx toy" in j.prompt for j in jobs)
    assert [j.seed for j in jobs] == [11, 12]
    assert {(j.negative_prompt, j.guidance_scale, j.steps, j.height, j.width) for j in jobs} == {
        ("blurry", 5.0, 2, 64, 64)}


def test_sample_prompt_with_filewords_is_rewritten_like_training(config):
    concept = config.concepts_list[0]
    concept.save_sample_prompt = "a drawing of [filewords]"
    prompts = [j.prompt for j in concept_sample_jobs(config, 0)]
    captions = [e.prompt for e in collect_training_data(config).instance]  # '[filewords]'
    assert prompts == [f"a drawing of {c}" for c in captions[:2]]


def test_plain_sample_prompt_and_random_seed(config):
    concept = config.concepts_list[0]
    concept.save_sample_prompt, concept.sample_seed, concept.n_save_sample = "zwx toy", -1, 3
    jobs = concept_sample_jobs(config, 0, seed=500)
    assert [(j.prompt, j.seed) for j in jobs] == [("zwx toy", 500), ("zwx toy", 501),
                                                  ("zwx toy", 502)]
    drawn = concept_sample_jobs(config, 0)
    assert drawn[0].seed >= 0 and drawn[1].seed == drawn[0].seed + 1


def test_template_file_gives_each_line_n_samples(config, tmp_path):
    template = tmp_path / "prompts.txt"
    template.write_text("\ufeffzwx toy on a beach\n\n  zwx toy   in snow \n[filewords], painting\n",
                        encoding="utf-8")
    concept = config.concepts_list[0]
    concept.save_sample_template = str(template)
    concept.save_sample_prompt = "ignored when a template is set"
    jobs = concept_sample_jobs(config, 0)
    built = [e.prompt for e in collect_training_data(config).instance]
    assert [(j.prompt, j.seed) for j in jobs] == [
        ("zwx toy on a beach", 11), ("zwx toy on a beach", 12),
        ("zwx toy in snow", 11), ("zwx toy in snow", 12),
        (f"{built[0]}, painting", 11), (f"{built[1]}, painting", 12)]

    concept.save_sample_template = str(tmp_path / "missing.txt")
    with pytest.raises(PromptError, match="concept 1.*missing.txt.*does not exist"):
        concept_sample_jobs(config, 0)


def test_sample_concepts_saves_pngs_and_a_labelled_grid(config, pipe, tmp_path):
    out = tmp_path / "samples"
    result = sample_concepts(config, pipe=pipe, out_dir=out, progress=False)

    assert [p.name for p in result.paths] == ["sample-001-000.png", "sample-001-001.png"]
    assert result.grid_path == out / "sample-001-grid.png"
    assert result.prompts == [j.prompt for j in concept_sample_jobs(config, 0)]
    for path, image, job in zip(result.paths, result.images, result.jobs):
        with Image.open(path) as saved:
            assert np.array_equal(array(saved), array(image))
            assert f"Seed: {job.seed}" in saved.text["parameters"]
            assert saved.text["parameters"].startswith(job.prompt + "\n")
    with Image.open(result.grid_path) as grid:
        assert grid.size == result.grid.size
        assert grid.width == 128 and grid.height > 64  # two columns, a label row under them
    assert result._repr_png_().startswith(b"\x89PNG")  # a notebook shows it inline

    # A second run with the same seed: the same pixels, new files, the old ones kept.
    again = sample_concepts(config, pipe=pipe, out_dir=out, progress=False)
    assert [p.name for p in again.paths] == ["sample-002-000.png", "sample-002-001.png"]
    assert all(np.array_equal(array(a), array(b)) for a, b in zip(result.images, again.images))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_sample_concepts_defaults_to_the_trained_model_folder(config):
    with pytest.raises(ModelLoadError, match="no trained model.*train first"):
        sample_concepts(config, progress=False)


def test_grid_size_and_labels():
    colours = ["red", "green", "blue", "yellow", "purple"]
    images = [Image.new("RGB", (64, 64), c) for c in colours]
    plain = image_grid(images, columns=2)
    assert plain.size == (128, 192)

    labels = ["zwx toy", "a toy", "a long prompt that wraps over several lines here", "x", ""]
    grid = image_grid(images, labels, columns=2)
    cell_h = grid.height // 3
    assert grid.width == 128 and grid.height == 3 * cell_h and cell_h > 64
    pixels = np.asarray(grid)
    for k, colour in enumerate(colours):
        x, y = (k % 2) * 64, (k // 2) * cell_h
        assert tuple(pixels[y + 32, x + 32]) == Image.new("RGB", (1, 1), colour).getpixel((0, 0))
        label_area = pixels[y + 64:y + cell_h, x:x + 64]
        assert (label_area.min() < 128) == bool(labels[k]), k  # dark text under labelled ones
    with pytest.raises(ValueError):
        image_grid([])


def test_save_images_writes_whole_files(tmp_path):
    images = [Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")]
    paths = save_images(images, tmp_path / "out", "epoch-0001", parameters=["p0", "p1"])
    assert [p.name for p in paths] == ["epoch-0001-000.png", "epoch-0001-001.png"]
    with Image.open(paths[1]) as im:
        assert im.text["parameters"] == "p1"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in paths]


def test_resolve_model_accepts_the_working_folder(tmp_path):
    working = tmp_path / "dreambooth" / "m"
    (working / "model").mkdir(parents=True)
    (working / "model" / "model_index.json").write_text("{}")
    assert resolve_model(working) == working / "model"
    assert resolve_model(working / "model") == working / "model"
    with pytest.raises(ModelLoadError, match="not a diffusers model folder"):
        resolve_model(tmp_path)
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model("models/dreambooth/nothing/model")


def test_cli_samples_every_prompt_and_prints_the_files(pipe, tmp_path, capsys, monkeypatch):
    parser = cli.build_parser()
    out = tmp_path / "cli"
    args = parser.parse_args([
        "sample", str(tiny_model_path()), "--prompt", "zwx toy", "--prompt", "a toy",
        "--n", "2", "--seed", "5", "--steps", "2", "--height", "64", "--width", "64",
        "--negative-prompt", "blurry", "--guidance-scale", "6", "--out", str(out),
        "--no-progress"])
    monkeypatch.setattr(sample, "load_pipeline", lambda model_dir, device=None: pipe)

    assert args.run(args) == 0
    printed = capsys.readouterr().out
    files = sorted(out.glob("sample-001-0*.png"))
    assert len(files) == 4 and (out / "sample-001-grid.png").is_file()
    assert all(str(f) in printed for f in files) and "sample-001-grid.png" in printed
    expected = generate_samples(pipe, "a toy", n=2, seed=5, negative_prompt="blurry",
                                guidance_scale=6, steps=2, height=64, width=64, progress=False)
    with Image.open(files[3]) as fourth:
        assert np.array_equal(array(fourth), array(expected[1]))
        assert "Seed: 6" in fourth.text["parameters"]


def test_cli_rejects_bad_sizes(tmp_path, capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["sample", "tiny", "--prompt", "x", "--height", "100",
                              "--out", str(tmp_path)])
    assert args.run(args) == 2
    assert "multiples of 8" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # under the field's minimum: a usage error
        parser.parse_args(["sample", "tiny", "--prompt", "x", "--height", "60"])
    assert stop.value.code == 2 and "--height: must be at least 64" in capsys.readouterr().err


def test_run_samples_with_plain_jobs(pipe, tmp_path):
    jobs = [SampleJob("zwx toy", 1, steps=2, height=64, width=64),
            SampleJob("a toy", 1, steps=2, height=64, width=64)]
    result = run_samples(pipe, jobs, tmp_path, prefix="check", columns=1, progress=False)
    assert [p.name for p in result.paths] == ["check-001-000.png", "check-001-001.png"]
    assert result.grid.width == 64 and result.labels == ["zwx toy", "a toy"]
    assert isinstance(result.grid_path, Path) and result.grid_path.is_file()
