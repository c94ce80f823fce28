"""Disk space planned before training: sizes per destination, Google Drive's quota and bin,
Kaggle's 20 GB cap, refusal with the ways out (free space stood in by a stub or real folders)."""

from __future__ import annotations

from pathlib import Path

import pytest

from colab_dreambooth.config.concept import Concept
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.training import space
from colab_dreambooth.training.memory import SD15
from colab_dreambooth.training.space import (
    DiskSpaceError,
    checkpoint_bytes,
    free_space,
    model_bytes,
    plan_space,
    ways_out,
)

GB = 1e9


def sd15(tmp_path: Path, **changes) -> DreamBoothConfig:
    base = dict(models_root=str(tmp_path / "content" / "models"), model_name="dog",
                use_8bit_adam=False, train_text_encoder=True, max_train_steps=800,
                concepts_list=[Concept(instance_prompt="photo of sks dog",
                                       instance_data_dir=str(tmp_path / "dog"))])
    base.update(changes)
    return DreamBoothConfig(**base)


def test_sizes_by_optimizer_and_precision(tmp_path):
    config = sd15(tmp_path)
    assert checkpoint_bytes(config, SD15, eight_bit=False) / GB == pytest.approx(11.8, abs=0.1)
    assert checkpoint_bytes(config, SD15, eight_bit=True) / GB == pytest.approx(11.8, abs=0.1)
    eight = config.copy(use_8bit_adam=True)
    assert checkpoint_bytes(eight, SD15, eight_bit=True) / GB == pytest.approx(5.9, abs=0.1)
    unet_only = config.copy(train_text_encoder=False)
    assert checkpoint_bytes(unet_only, SD15, eight_bit=False) / GB == pytest.approx(10.3, abs=0.1)
    lora = config.copy(use_lora=True)
    assert checkpoint_bytes(lora, SD15, eight_bit=False) < 20e6
    assert model_bytes(config, SD15) / GB == pytest.approx(4.3, abs=0.1)
    assert model_bytes(lora, SD15) < 10e6


@pytest.fixture
def drive(tmp_path, monkeypatch):
    """A stand-in Google Drive folder with 15 GB free; the local disk has 100 GB."""
    folder = tmp_path / "drive" / "MyDrive"
    folder.mkdir(parents=True)
    monkeypatch.setattr(space, "on_google_drive", lambda p: "drive" in Path(p).parts)
    return folder


def free_stub(path: Path) -> int:
    return int(15 * GB) if "drive" in Path(path).parts else int(100 * GB)


def test_checkpoints_on_a_15_gb_drive_are_refused_with_the_ways_out(tmp_path, drive):
    config = sd15(tmp_path, checkpoint_dir=str(drive / "ckpt"), save_every_steps=200)
    plan = plan_space(config, total_steps=800, sizes=SD15, free=free_stub)
    assert not plan.fits
    [on_drive] = [d for d in plan.disks if d.drive]
    # 4 checkpoints (200, 400, 600, the end): on Drive the replaced ones stay in the bin.
    assert on_drive.needed / GB == pytest.approx(4 * 11.8 * 1.05, rel=0.02)
    assert any("bin" in note for note in plan.notes)
    choices = ways_out(config, plan, bitsandbytes=False, sizes=SD15)
    error = DiskSpaceError(plan, choices)
    message = str(error)
    assert "Google Drive" in message and "15.0 GB free" in message
    assert "Checkpoint Hub repo" in message and "Empty bin" in message
    assert "install bitsandbytes" in message and "5.9 GB a checkpoint instead of 11.8 GB" in message
    assert "turn on Use LORA" in message and "force" in message
    # A LoRA run fits easily, on Drive too.
    assert plan_space(config.copy(use_lora=True), total_steps=800, sizes=SD15,
                      free=free_stub).fits


def test_rotation_needs_room_for_two_checkpoints_on_a_local_disk(tmp_path):
    config = sd15(tmp_path, save_every_steps=200, checkpoints_to_keep=1)
    roomy = plan_space(config, total_steps=800, sizes=SD15, free=lambda p: int(100 * GB))
    [disk] = roomy.disks
    assert roomy.fits and [w.what for w in disk.writes] == ["checkpoints", "model"]
    assert disk.writes[0].bytes / GB == pytest.approx(2 * 11.8, abs=0.2)
    tight = plan_space(config, total_steps=800, sizes=SD15, free=lambda p: int(20 * GB))
    assert not tight.fits
    choices = ways_out(config, tight, bitsandbytes=True, sizes=SD15)
    assert "room for one checkpoint" in choices[0] and "turn on Use 8bit Adam" in " ".join(choices)


def test_class_images_and_previews_are_counted(tmp_path):
    classes = tmp_path / "classes"
    classes.mkdir()
    for i in range(30):
        (classes / f"{i}.png").write_bytes(b"x")
    concept = Concept(instance_prompt="sks dog", class_prompt="dog", instance_data_dir="/x",
                      class_data_dir=str(classes), num_class_images=100)
    config = sd15(tmp_path, concepts_list=[concept], save_preview_every_steps=100)
    plan = plan_space(config, total_steps=800, sizes=SD15, free=lambda p: int(100 * GB))
    writes = {w.what: w for d in plan.disks for w in d.writes}
    assert "70 PNG(s)" in writes["class images"].how
    assert writes["previews"].bytes > 0


def test_kaggle_working_is_capped_at_20_gb(tmp_path):
    working = tmp_path / "kaggle" / "working"
    working.mkdir(parents=True)
    (working / "old.bin").write_bytes(b"\0" * 1_000_000)
    free = free_space(working / "models", kaggle_working=working)
    assert free <= 20 * GB - 1_000_000
    outside = free_space(tmp_path, kaggle_working=working)
    assert outside > free or outside < 20 * GB  # df alone outside the cap


def test_train_refuses_before_class_images_or_models(tiny_config, monkeypatch):
    from colab_dreambooth.training import train as train_module

    def nothing(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(train_module, "load_components", nothing)
    monkeypatch.setattr(train_module, "generate_class_images", nothing)
    monkeypatch.setattr(space, "free_space", lambda folder: 1000)
    with pytest.raises(DiskSpaceError, match="will not fit"):
        train_module.train(tiny_config, progress=False)


def test_drive_is_told_apart_even_before_the_folder_exists(tmp_path, drive):
    unmade = tmp_path / "elsewhere" / "drive" / "MyDrive" / "ckpt"  # nothing of it exists
    config = sd15(tmp_path, checkpoint_dir=str(unmade))
    plan = plan_space(config, total_steps=800, sizes=SD15, free=free_stub)
    assert [(d.drive, [w.what for w in d.writes]) for d in plan.disks] == [
        (True, ["checkpoints"]), (False, ["model"])]
