"""After training: samples, export, model card, dehydrate and sending (the network mocked)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from colab_dreambooth.models.lora_file import file_adapter_type, read_lora
from colab_dreambooth.publish.release import (
    ReleaseSettings,
    check_release,
    make_release,
    release_folder,
    sample_model,
)
from colab_dreambooth.runtime import storage
from colab_dreambooth.training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory):
    """A tiny model trained for 2 steps, as notebook 03 leaves it."""
    from colab_dreambooth.demo import demo_config

    config = demo_config(demo_root, steps=2).copy(
        models_root=str(tmp_path_factory.mktemp("release")), model_name="star")
    config.concepts_list[0] = dataclasses.replace(
        config.concepts_list[0], class_prompt="", num_class_images=0, class_data_dir="",
        n_save_sample=1, save_infer_steps=2)
    train(config, progress=False)
    return config


def test_check_release_names_each_bad_setting():
    assert check_release(ReleaseSettings()) == []
    assert check_release(ReleaseSettings(destination="hf://me/my-model")) == []
    problems = check_release(ReleaseSettings(export_name="my/model", dehydrate_rank=0,
                                             destination="hf://just-a-name"))
    assert len(problems) == 3
    assert problems[0].startswith("Export file name") and "'mymodel'" in problems[0]
    assert problems[1].startswith("Dehydrate rank") and problems[2].startswith("Send to")


def test_release_without_a_trained_model_says_so(tiny_config):
    with pytest.raises(Exception, match="no trained model .*train first"):
        make_release(tiny_config, ReleaseSettings())


def test_release_to_a_folder_and_to_the_hub(trained, tmp_path, monkeypatch):
    samples = sample_model(trained, "a photo of zwx toy on the moon", progress=False)
    assert samples.prompts == ["a photo of zwx toy on the moon"]
    assert samples.grid_path.is_file()

    # A folder (e.g. on Drive): one folder per model, the diffusers folder with it.
    drive = tmp_path / "drive"
    steps = []
    result = make_release(trained, ReleaseSettings(export_name="star-v1", destination=str(drive)),
                          grid=samples.grid, progress=False, on_status=steps.append)
    folder = release_folder(trained)
    assert result.export == folder / "star-v1.safetensors" and result.export.stat().st_size
    assert result.card == folder / "README.md" and (folder / "samples.png").is_file()
    assert result.dehydrated is None
    sent = drive / "star-v1"
    assert sorted(p.name for p in sent.iterdir()) == sorted(
        ["star-v1.safetensors", "README.md", "samples.png"]
        + [p.name for p in (trained.model_dir / "model").iterdir()])
    assert steps[0].startswith("Exporting star-v1.safetensors (fp16)")
    assert any(line.startswith("Sending") for line in steps)

    # A Hub repo: every item at the repo's root, the card naming the repo, no params.json.
    uploads = []
    monkeypatch.setattr(storage, "upload_to_hub", lambda path, repo, **kw: uploads.append(
        (Path(path).name, repo.repo_id, kw["private"])) or repo.url)
    result = make_release(trained, ReleaseSettings(destination="hf://me/star", fp16=False,
                                                   private=False, dehydrate=True),
                          progress=False)
    names = [name for name, _, _ in uploads]
    assert {"star.safetensors", "README.md", "star.dehydrated.safetensors", "unet",
            "model_index.json"} <= set(names)
    assert "params.json" not in names and "samples.png" not in names  # no grid given
    assert {(repo, private) for _, repo, private in uploads} == {("me/star", False)}
    assert result.sent == ["https://huggingface.co/me/star"] * len(uploads)
    assert 'from_pretrained("me/star"' in result.card.read_text(encoding="utf-8")
    assert "fp32" in str(result)


def test_nothing_is_sent_for_a_blank_destination(trained):
    result = make_release(trained, ReleaseSettings(model_card=False), progress=False)
    assert result.sent == [] and result.card is None
    assert "stay in" in str(result)


def test_release_extracts_a_lora_from_the_full_fine_tune(trained):
    """Extract a LoRA: the SVD of the fine-tune's change, written beside the export in the
    kohya layout, at the release form's rank."""
    result = make_release(trained, ReleaseSettings(model_card=False, export_name="star",
                                                   extract_lora=True, extract_rank=4),
                          progress=False)
    assert result.extracted == result.folder / "star_lora_r4.safetensors"
    state, meta = read_lora(result.extracted)
    assert file_adapter_type(state) == "LoRA" and meta["ss_network_dim"] == "4"
    assert all(v.shape[0] <= 4 for k, v in state.items() if k.endswith("lora_down.weight"))
    assert "extract" in str(result).lower()
    assert check_release(ReleaseSettings(extract_lora=True, extract_rank=0))
