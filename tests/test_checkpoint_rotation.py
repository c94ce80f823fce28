"""Checkpoint rotation never leaves zero checkpoints, and the log says when one is safely on
the disk (or on Google Drive, whose bin keeps what rotation deletes)."""

from __future__ import annotations

import logging

import pytest

from colab_dreambooth.training import checkpoints
from colab_dreambooth.training.checkpoints import list_checkpoints
from colab_dreambooth.training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_full_disk_keeps_the_previous_checkpoint(tiny_config, tmp_path, monkeypatch, caplog):
    root = tmp_path / "ckpt"

    def free(folder):  # room for the first checkpoint only
        return 10**12 if not list_checkpoints(root) else 1000

    monkeypatch.setattr(checkpoints, "free_bytes", free)
    monkeypatch.setattr(checkpoints, "on_google_drive", lambda path: True)
    config = tiny_config.copy(max_train_steps=6, save_every_steps=2, checkpoints_to_keep=1,
                              checkpoint_dir=str(root), use_ema=False, seed=3)
    with caplog.at_level(logging.INFO, logger="colab_dreambooth"):
        result = train(config, progress=False)
    assert result.steps == 6
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-00000002"]
    assert result.checkpoint == root / "checkpoint-00000002"
    assert "Checkpoint at step 2 is complete and flushed to Google Drive" in caplog.text
    assert "the previous one is kept" in caplog.text and "bin" in caplog.text
    assert not list(root.glob(".tmp-*"))


def test_rotation_deletes_the_old_one_only_after_the_new_one(tiny_config, tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    seen = []
    real_prune = checkpoints.prune

    def prune(folder, keep):  # what exists whenever rotation deletes
        seen.append([p.name for p in list_checkpoints(folder)])
        return real_prune(folder, keep)

    monkeypatch.setattr(checkpoints, "prune", prune)
    config = tiny_config.copy(max_train_steps=4, save_every_steps=2, checkpoints_to_keep=1,
                              checkpoint_dir=str(root), use_ema=False, seed=3)
    train(config, progress=False)
    assert seen[-1] == ["checkpoint-00000002", "checkpoint-00000004"]
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-00000004"]
    assert (root / "checkpoint-00000004" / "optimizer.json").is_file()
    assert not (root / "checkpoint-00000004" / "optimizer.pt").exists()


def test_checkpoints_of_format_1_still_resume_exactly(tiny_config, tmp_path):
    """A checkpoint written before streaming (optimizer.pt, format 1) resumes to the very
    weights of a run that went on with the new format."""
    import json

    import torch
    from safetensors.torch import load_file

    def run(name, steps, resume=False):
        config = tiny_config.copy(model_name=name, max_train_steps=steps, use_ema=False,
                                  seed=5, save_every_steps=0, checkpoints_to_keep=1,
                                  checkpoint_dir=str(tmp_path / name / "ckpt"))
        return train(config, progress=False, resume=resume)

    run("old", 2)
    folder = list_checkpoints(tmp_path / "old" / "ckpt")[-1]
    record = json.loads((folder / "optimizer.json").read_text())
    tensors = load_file(folder / "optimizer.safetensors")

    def decode(value):
        if isinstance(value, dict) and set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if isinstance(value, dict):
            return {k: decode(v) for k, v in value.items()}
        return [decode(v) for v in value] if isinstance(value, list) else value

    torch.save({"state": {i: decode(s) for i, s in record["state"]},
                "param_groups": [decode(g) for g in record["param_groups"]]},
               folder / "optimizer.pt")
    (folder / "optimizer.json").unlink()
    (folder / "optimizer.safetensors").unlink()
    state = json.loads((folder / "state.json").read_text())
    state["format"] = 1
    state["files"] = {p.name: p.stat().st_size for p in folder.iterdir() if p.name != "state.json"}
    (folder / "state.json").write_text(json.dumps(state))

    resumed = run("old", 4, resume=True)
    assert resumed.resumed_from == folder and resumed.steps == 4
    run("new", 2)
    straight = run("new", 4, resume=True)
    assert resumed.losses == straight.losses
