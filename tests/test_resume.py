"""Checkpoints and exact resume on the tiny model: a run stopped (or killed) and resumed ends
with the very weights of a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import torch
from run_helpers import train_whole_and_killed
from safetensors.torch import load_file

from colab_dreambooth.training.checkpoints import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    read_state,
)
from colab_dreambooth.training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def resumable(config, tmp_path, name, **changes):
    """The demo config with the options that make every state matter: flips and random crops,
    prior preservation, text encoder, EMA, warmup + cosine schedule, grad accumulation."""
    base = dict(model_name=name, models_root=str(tmp_path), seed=1234, max_train_steps=8,
                hflip=True, center_crop=False, use_ema=True, train_text_encoder=True,
                lr_scheduler="cosine", lr_warmup_steps=2, gradient_accumulation_steps=2,
                save_every_steps=3, checkpoints_to_keep=2, cache_latents=False)
    base.update(changes)
    return config.copy(**base)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("unet", "text_encoder", "unet_ema"):
        for f in sorted((model_dir / part).glob("*.safetensors")):
            out.update({f"{part}.{k}": v for k, v in load_file(f).items()})
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and len(wa) > 100
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_stop_then_resume_equals_uninterrupted_run(tiny_config, tmp_path):
    whole = train(resumable(tiny_config, tmp_path, "whole"), progress=False)
    assert whole.steps == 8 and not whole.stopped_early

    config = resumable(tiny_config, tmp_path, "split")
    stop = threading.Event()
    first = train(config, stop=stop, progress=False,
                  on_step=lambda step, loss, lr: step == 5 and stop.set())
    assert first.stopped_early and first.steps == 5
    assert first.checkpoint.name == "checkpoint-00000005"
    # Saved every 3 steps and at the stop; two kept.
    assert [p.name for p in list_checkpoints(first.checkpoint.parent)] == [
        "checkpoint-00000003", "checkpoint-00000005"]

    second = train(config, resume=True, progress=False)
    assert second.resumed_from == first.checkpoint
    assert second.steps == 8 and not second.stopped_early
    assert second.losses[:5] == first.losses and len(second.losses) == 8
    assert second.losses == whole.losses
    assert_same_weights(whole.model_dir, second.model_dir)


def test_resume_with_cached_latents_mid_epoch(tiny_config, tmp_path):
    """Batch 2 over 6 images = 3 batches an epoch: step 4 stops mid-epoch, so the resumed
    run must skip exactly the batches already trained."""
    changes = dict(cache_latents=True, gradient_accumulation_steps=1, use_ema=False,
                   max_train_steps=7, save_every_steps=0)
    whole = train(resumable(tiny_config, tmp_path, "whole", **changes), progress=False)
    config = resumable(tiny_config, tmp_path, "split", **changes)
    stop = threading.Event()
    first = train(config, stop=stop, progress=False,
                  on_step=lambda step, loss, lr: step == 4 and stop.set())
    state = read_state(first.checkpoint)
    assert state["progress"]["epoch"] == 1 and state["progress"]["batch_in_epoch"] == 1
    second = train(config, resume=True, progress=False)
    assert second.losses == whole.losses
    assert_same_weights(whole.model_dir, second.model_dir)


def test_resume_ignores_half_written_and_damaged_checkpoints(tiny_config, tmp_path):
    config = resumable(tiny_config, tmp_path, "m", max_train_steps=4, save_every_steps=2,
                       use_ema=False, train_text_encoder=False, gradient_accumulation_steps=1)
    result = train(config, progress=False)
    root = result.checkpoint.parent
    good = latest_checkpoint(root)
    assert good.name == "checkpoint-00000004"
    # A kill during a write leaves a hidden temporary folder; one damaged on Drive loses bytes.
    (root / ".tmp-checkpoint-00000006").mkdir()
    (root / ".tmp-checkpoint-00000006" / "unet.safetensors").write_bytes(b"partial")
    damaged = root / "checkpoint-00000008"
    import shutil

    shutil.copytree(good, damaged)
    state = json.loads((damaged / "state.json").read_text())
    state["progress"]["step"] = 8
    (damaged / "state.json").write_text(json.dumps(state))
    with open(damaged / "unet.safetensors", "r+b") as f:
        f.truncate(100)
    assert latest_checkpoint(root) == good
    again = train(config.copy(max_train_steps=6), resume=True, progress=False)
    assert again.resumed_from == good and again.steps == 6
    assert not (root / ".tmp-checkpoint-00000006").exists()  # cleaned up by the next write


def test_resume_refuses_other_settings(tiny_config, tmp_path):
    config = resumable(tiny_config, tmp_path, "m", max_train_steps=2, use_ema=False,
                       gradient_accumulation_steps=1)
    train(config, progress=False)
    with pytest.raises(CheckpointError, match="train_batch_size: 2 in the checkpoint, 3 now"):
        train(config.copy(train_batch_size=3), resume=True, progress=False)


def test_resume_without_checkpoint_starts_fresh(tiny_config, tmp_path, caplog):
    config = resumable(tiny_config, tmp_path, "fresh", max_train_steps=2, use_ema=False,
                       gradient_accumulation_steps=1)
    result = train(config, resume=True, progress=False)
    assert result.resumed_from is None and result.steps == 2
    assert "no complete checkpoint" in caplog.text


def test_checkpoint_folder_setting_and_continue_longer(tiny_config, tmp_path):
    folder = tmp_path / "drive" / "ckpts"
    config = resumable(tiny_config, tmp_path, "m", max_train_steps=3, use_ema=False,
                       gradient_accumulation_steps=1, checkpoint_dir=str(folder),
                       save_every_steps=0, checkpoints_to_keep=1)
    first = train(config, progress=False)
    assert first.checkpoint == folder / "checkpoint-00000003"
    longer = train(config.copy(max_train_steps=5), resume=True, progress=False)
    assert longer.steps == 5 and longer.losses[:3] == first.losses
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-00000005"]


def test_sigkill_mid_run_then_resume_matches(demo_root, tmp_path):
    """The issue's test: a real process killed with SIGKILL after a checkpoint, resumed with
    ``train --resume``, ends with the weights of a run that was never interrupted."""
    from colab_dreambooth.demo import demo_config

    base = demo_config(demo_root, steps=12).copy(
        models_root=str(tmp_path), seed=99, hflip=True, center_crop=False, use_ema=True,
        gradient_accumulation_steps=1, save_every_steps=2, checkpoints_to_keep=2,
        save_preview_every=0, save_preview_every_steps=0)
    whole, killed = train_whole_and_killed(base, tmp_path)
    assert_same_weights(whole / "model", killed / "model")


class FakeHub:
    """The Hub's network stood in by a local folder: uploads copy into it, downloads copy out."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[tuple] = []

    def api_class(self) -> type:
        """A stand-in for the HfApi class (a class: other libraries annotate with it)."""
        hub = self

        class Api:
            def __init__(self, token=None):
                self.token = token

            def create_repo(self, repo_id, private, exist_ok, repo_type):
                hub.calls.append(("create_repo", repo_id, private, self.token))

            def upload_folder(self, folder_path, repo_id, path_in_repo, commit_message):
                import shutil

                shutil.copytree(folder_path, hub.root / repo_id / path_in_repo)
                hub.calls.append(("upload_folder", path_in_repo))

            def delete_folder(self, path_in_repo, repo_id, commit_message):
                import shutil

                shutil.rmtree(hub.root / repo_id / path_in_repo)
                hub.calls.append(("delete_folder", path_in_repo))

            def list_repo_files(self, repo_id):
                base = hub.root / repo_id
                return [p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()]

        return Api

    def snapshot_download(self, repo_id, allow_patterns, local_dir, token):
        import fnmatch
        import shutil

        base = self.root / repo_id
        for p in base.rglob("*"):
            rel = p.relative_to(base).as_posix()
            if p.is_file() and any(fnmatch.fnmatch(rel, pat) for pat in allow_patterns):
                (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, Path(local_dir) / rel)
        self.calls.append(("snapshot_download", tuple(allow_patterns)))


def test_checkpoints_to_the_hub_and_resume_from_it(tiny_config, tmp_path, monkeypatch, caplog):
    import shutil

    import huggingface_hub

    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api_class())
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    token = "hf_" + "T" * 34
    monkeypatch.setenv("HF_TOKEN", token)
    config = resumable(tiny_config, tmp_path, "hubbed", max_train_steps=4, save_every_steps=2,
                       checkpoints_to_keep=1, use_ema=False, gradient_accumulation_steps=1,
                       checkpoint_hub_repo="hf://me/ckpts")
    first = train(config, progress=False)
    assert ("create_repo", "me/ckpts", True, token) in hub.calls  # private, token passed on
    assert ("delete_folder", "checkpoints/checkpoint-00000002") in hub.calls
    remote = sorted(p.name for p in (tmp_path / "hub" / "me" / "ckpts" / "checkpoints").iterdir())
    assert remote == ["checkpoint-00000004"]

    shutil.rmtree(first.checkpoint.parent)  # a new Colab machine: nothing local
    again = train(config.copy(max_train_steps=6), resume=True, progress=False)
    assert again.resumed_from.name == "checkpoint-00000004" and again.steps == 6
    assert again.losses[:4] == first.losses
    assert token not in caplog.text
    saved = (first.model_dir / "params.json").read_text()
    assert token not in saved and "hf://me/ckpts" in saved


def test_ctrl_c_stops_after_the_step_with_a_checkpoint(tiny_config, tmp_path):
    """A notebook's interrupt (SIGINT) mid-run: the step finishes, a checkpoint and the model
    are written, and the run resumes from that very step."""
    config = resumable(tiny_config, tmp_path, "m", max_train_steps=6, use_ema=False,
                       gradient_accumulation_steps=1, save_every_steps=0)
    result = train(config, progress=False,
                   on_step=lambda step, loss, lr: step == 3 and os.kill(os.getpid(),
                                                                        signal.SIGINT))
    assert result.stopped_early and result.steps == 3
    assert result.checkpoint.name == "checkpoint-00000003"
    assert (result.model_dir / "model_index.json").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_full_disk_skips_the_checkpoint_and_training_goes_on(tiny_config, tmp_path,
                                                              monkeypatch, caplog):
    from colab_dreambooth.training import checkpoints

    monkeypatch.setattr(checkpoints, "free_bytes", lambda folder: 1000)
    config = resumable(tiny_config, tmp_path, "m", max_train_steps=4, use_ema=False,
                       gradient_accumulation_steps=1, save_every_steps=2)
    result = train(config, progress=False)
    assert result.steps == 4 and result.checkpoint is None
    assert "Not enough free space" in caplog.text
    assert (result.model_dir / "model_index.json").is_file()
    assert list_checkpoints(tmp_path / "dreambooth" / "m" / "checkpoints") == []


def test_lora_run_resumes_exactly_with_small_checkpoints(tiny_config, tmp_path):
    changes = dict(use_lora=True, use_ema=False, gradient_accumulation_steps=1, max_train_steps=6,
                   save_every_steps=0, lora_learning_rate=1e-3, lora_txt_learning_rate=5e-4)
    whole = train(resumable(tiny_config, tmp_path, "whole", **changes), progress=False)
    config = resumable(tiny_config, tmp_path, "split", **changes)
    stop = threading.Event()
    first = train(config, stop=stop, progress=False,
                  on_step=lambda step, loss, lr: step == 2 and stop.set())
    saved = load_file(first.checkpoint / "unet.safetensors")
    assert saved and all("lora_" in k for k in saved)  # only the adapters, not the base
    second = train(config, resume=True, progress=False)
    assert second.losses == whole.losses
    a, b = load_file(whole.lora_file), load_file(second.lora_file)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_on_another_gpu_keeps_the_runs_auto_choices(tiny_config, tmp_path):
    """Blank (auto) batch size etc. come from the GPU preset; a resume on a machine whose
    preset differs keeps what the checkpoint's run used instead of refusing."""
    from colab_dreambooth.training.resume import keep_checkpoint_choices

    config = resumable(tiny_config, tmp_path, "m", max_train_steps=2, use_ema=False,
                       gradient_accumulation_steps=1, train_batch_size=2)
    first = train(config, progress=False)
    auto = config.copy(train_batch_size=None, cache_latents=None)
    kept = keep_checkpoint_choices(auto, first.checkpoint)
    assert kept.train_batch_size == 2 and kept.cache_latents is False
    mine = keep_checkpoint_choices(config.copy(train_batch_size=3), first.checkpoint)
    assert mine.train_batch_size == 3  # the user's own value is never replaced


def test_a_new_run_never_buries_an_interrupted_one(tiny_config, tmp_path):
    config = resumable(tiny_config, tmp_path, "m", max_train_steps=6, use_ema=False,
                       gradient_accumulation_steps=1, save_every_steps=0)
    stop = threading.Event()
    first = train(config, stop=stop, progress=False,
                  on_step=lambda step, loss, lr: step == 2 and stop.set())
    # Rerunning the cell without resume: refused before any model loads, checkpoint kept.
    with pytest.raises(CheckpointError, match="interrupted run .step 2 of 6.*resume"):
        train(config, progress=False)
    assert latest_checkpoint(first.checkpoint.parent) == first.checkpoint
    finished = train(config, resume=True, progress=False)
    assert finished.steps == 6
    # A finished run's checkpoint is replaced by a new run's, newest written first.
    again = train(config.copy(max_train_steps=3, learning_rate=5e-4), progress=False)
    assert again.resumed_from is None and again.steps == 3
    assert [p.name for p in list_checkpoints(first.checkpoint.parent)] == [
        "checkpoint-00000006", "checkpoint-00000003"]  # two kept, oldest written first
    assert latest_checkpoint(first.checkpoint.parent) == again.checkpoint
