"""The Hub model card, written for a model really trained (two steps) on the tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from colab_dreambooth.config.concept import Concept
from colab_dreambooth.config.params import read_params
from colab_dreambooth.demo import demo_config
from colab_dreambooth.publish.model_card import (
    ModelCardError,
    card_prompt,
    card_text,
    trigger_word,
    write_model_card,
)
from colab_dreambooth.training.train import train


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory):
    """A model folder as train() leaves it (params.json, training_info.json), and its config."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is fastest on one thread
    try:
        root = tmp_path_factory.mktemp("card")
        config = demo_config(demo_root, steps=2).copy(models_root=str(root),
                                                      model_name="zwx-star", use_ema=True)
        result = train(config, progress=False)
    finally:
        torch.set_num_threads(threads)
    return result, config


def front_matter(text: str) -> dict[str, object]:
    """Parse the card's YAML front matter as key: value lines and '- item' lists."""
    lines = text.splitlines()
    assert lines[0] == "---"
    end = lines.index("---", 1)
    data: dict[str, object] = {}
    key = None
    for line in lines[1:end]:
        if line.startswith("- "):
            assert isinstance(data[key], list), line
            data[key].append(line[2:])
            continue
        key, sep, value = line.partition(":")
        assert sep and re.fullmatch(r"[a-z_]+", key), line
        value = value.strip()
        data[key] = json.loads(value) if value.startswith('"') else (value or [])
    return data


def test_card_of_a_trained_model(trained):
    result, config = trained
    grid = Image.new("RGB", (128, 80), "orange")
    card = write_model_card(result.model_dir, grid=grid, repo_id="someone/zwx-star")
    assert card == result.model_dir / "README.md"
    text = card.read_text(encoding="utf-8")

    meta = front_matter(text)
    assert meta["license"] == "creativeml-openrail-m"
    assert {"stable-diffusion", "text-to-image", "dreambooth", "diffusers"} <= set(meta["tags"])
    assert meta["instance_prompt"] == "a photo of zwx toy"
    assert "base_model" not in meta  # 'tiny' is no Hub id; the body names it
    yaml = pytest.importorskip("yaml")
    assert yaml.safe_load(text.split("---")[1])["tags"] == meta["tags"]

    assert "`zwx`" in text.split("## Trigger words")[1].split("##")[0]
    assert "tiny (colab-dreambooth's built-in test model)" in text
    assert "| Training steps | 2 |" in text
    assert "| Learning rate (UNet) | 0.001 |" in text
    assert "| Learning rate (text encoder) | 0.0005 |" in text
    assert "| Resolution | 64 px |" in text and "| Batch size | 2 |" in text
    assert "| Prior preservation | yes (12 class images, prior loss weight 1) |" in text
    assert "| Text encoder | trained |" in text and "| EMA | yes" in text
    assert "| Mixed precision | no (fp32, trained on the CPU) |" in text
    assert f"| Seed | {result.seed} |" in text
    assert 'from_pretrained("someone/zwx-star"' in text

    # The grid sits next to the card, linked relatively.
    assert "![Samples](samples.png)" in text
    with Image.open(result.model_dir / "samples.png") as copied:
        assert copied.size == (128, 80)

    # Folder names only: no absolute path of the user's data or models root.
    concept = config.concepts_list[0]
    assert "| instance |" in text
    for private in (concept.instance_data_dir, concept.class_data_dir, config.models_root,
                    str(Path(concept.instance_data_dir).parent)):
        assert private not in text
    assert not re.search(r"(?<![\w.])/(tmp|home|root|content)/", text)


def test_card_grid_from_a_file_and_a_chosen_path(trained, tmp_path):
    result, _ = trained
    grid_file = tmp_path / "grid.jpg"
    Image.new("RGB", (32, 32), "blue").save(grid_file)
    out = tmp_path / "upload" / "README.md"
    write_model_card(result.model_dir, out, grid=grid_file)
    assert out.is_file() and (out.parent / "samples.png").is_file()
    with Image.open(out.parent / "samples.png") as im:
        assert im.format == "PNG"
    assert grid_file.is_file()  # the input is left as it was
    assert 'from_pretrained("."' in out.read_text(encoding="utf-8")
    with pytest.raises(ModelCardError, match="not found"):
        write_model_card(result.model_dir, out, grid=tmp_path / "none.png")


def test_cli_writes_the_card(trained, tmp_path, capsys):
    from colab_dreambooth import cli

    result, _ = trained
    parser = cli.build_parser()
    out = tmp_path / "cli" / "README.md"
    args = parser.parse_args(["model-card", str(result.model_dir), "--out", str(out),
                              "--repo-id", "me/zwx"])
    assert args.run(args) == 0
    assert str(out) in capsys.readouterr().out and "# zwx" in out.read_text(encoding="utf-8")
    args = parser.parse_args(["model-card", str(tmp_path)])
    assert args.run(args) == 1 and "params.json not found" in capsys.readouterr().err


def test_card_needs_the_saved_params(tmp_path):
    with pytest.raises(ModelCardError, match="params.json not found"):
        write_model_card(tmp_path)


def test_hub_base_model_and_windows_paths_and_tokens(trained):
    result, _ = trained
    config = read_params(result.model_dir / "params.json").config.copy(
        pretrained_model_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5",
        model_name="hf_" + "a" * 34, models_root=r"D:\private\models")
    concept = config.concepts_list[0]
    concept.instance_data_dir = r"E:\dev\sd_db\photos\my_dog"
    concept.instance_prompt = "a photo of sks dog"
    concept.instance_token = ""
    concept.class_prompt = "a photo of dog"
    text = card_text(config, {"steps": 40, "total_steps": 100, "epochs": 3, "ema": False})

    meta = front_matter(text)
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert meta["instance_prompt"] == "a photo of sks dog"
    assert "[stable-diffusion-v1-5/stable-diffusion-v1-5](https://huggingface.co/" in text
    assert "`sks`" in text and "| my_dog |" in text
    assert "E:\\" not in text and "D:\\" not in text and "private" not in text
    assert "hf_" + "a" * 34 not in text and "hf_***" in text
    assert "| Training steps | 40 of 100 (stopped early) |" in text
    assert "| EMA | no |" in text


def test_local_base_model_shows_its_name_only(trained):
    result, _ = trained
    config = read_params(result.model_dir / "params.json").config.copy(
        src="/content/drive/MyDrive/models/my-base.safetensors")
    text = card_text(config, {})
    assert "base_model" not in front_matter(text)
    assert "my-base.safetensors (a local model)" in text and "/content" not in text


@pytest.mark.parametrize("concept, word", [
    (Concept(instance_prompt="photo of zwx toy", instance_token="zwx"), "zwx"),
    (Concept(instance_prompt="a photo of sks dog", class_prompt="a photo of dog"), "sks"),
    (Concept(instance_prompt="shs girl"), "shs"),
    (Concept(instance_prompt="[filewords]", class_token="a woman, woman"), ""),
])
def test_trigger_word(concept, word):
    assert trigger_word(concept) == word


def test_card_prompt_from_filewords():
    concept = Concept(instance_prompt="[filewords]", instance_token="ohwx",
                      class_token="a woman, woman")
    assert card_prompt(concept) == "a photo of ohwx woman"
    assert card_prompt(Concept(instance_prompt="shs  girl")) == "shs girl"
