"""``accelerate launch`` with two processes (CPU, gloo) trains the tiny model correctly: the
processes split the data, stay in sync, stop together, and resume exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from colab_dreambooth.config.params import save_params
from colab_dreambooth.demo import demo_config
from colab_dreambooth.training.checkpoints import latest_checkpoint, read_state

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "scripts" / "ddp_train.py"


def launch(params: Path, digests: Path, *extra: str) -> subprocess.CompletedProcess:
    """The README's command: accelerate launch --multi_gpu --num_processes 2 (CPU here)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               str(DRIVER), str(params), "--digests", str(digests), *extra]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_stop_and_resume_exactly(demo_root, tmp_path):
    base = demo_config(demo_root, steps=6).copy(
        models_root=str(tmp_path), seed=5, train_batch_size=1, hflip=True, center_crop=False,
        lr_scheduler="cosine", lr_warmup_steps=1, save_every_steps=0, save_preview_every=0,
        save_preview_every_steps=0, train_text_encoder=True)
    whole = save_params(base.copy(model_name="whole"), tmp_path / "whole.json")
    out = launch(whole, tmp_path / "whole-digests")
    assert out.stdout.count("steps=6 stopped=False") == 2  # both processes ran every step
    digests = {p.name: p.read_text() for p in (tmp_path / "whole-digests").iterdir()}
    assert len(digests) == 2 and len(set(digests.values())) == 1  # weights in sync
    info = read_state(latest_checkpoint(tmp_path / "dreambooth" / "whole" / "checkpoints"))
    # 6 images, batch 1 per process: 3 steps an epoch, so 6 steps = 2 epochs.
    assert info["processes"] == 2 and info["progress"]["epoch"] == 2
    assert (tmp_path / "dreambooth" / "whole" / "model" / "model_index.json").is_file()

    split = save_params(base.copy(model_name="split"), tmp_path / "split.json")
    out = launch(split, tmp_path / "first", "--stop-at", "4")
    assert out.stdout.count("steps=4 stopped=True") == 2  # rank 0's stop reached rank 1
    checkpoint = latest_checkpoint(tmp_path / "dreambooth" / "split" / "checkpoints")
    assert sorted(p.name for p in checkpoint.glob("random_states_*")) == [
        "random_states_0.pt", "random_states_1.pt"]
    out = launch(split, tmp_path / "second", "--resume")
    assert out.stdout.count("steps=6 stopped=False") == 2
    resumed = {p.name: p.read_text() for p in (tmp_path / "second").iterdir()}
    assert resumed == digests  # the same weights as the uninterrupted two-process run


def test_resume_with_another_process_count_is_refused(demo_root, tmp_path):
    from colab_dreambooth.training.checkpoints import CheckpointError
    from colab_dreambooth.training.train import train

    config = demo_config(demo_root, steps=2).copy(
        models_root=str(tmp_path), model_name="m", train_batch_size=1, save_preview_every=0,
        save_preview_every_steps=0)
    launch(save_params(config, tmp_path / "m.json"), tmp_path / "d")
    with pytest.raises(CheckpointError, match="processes: 2 in the checkpoint, 1 now"):
        train(config, resume=True, progress=False)


def test_two_processes_train_sdxl_in_sync(demo_root, tmp_path):
    """SDXL under DistributedDataParallel: both text encoders train as one wrapped module and
    the processes end with the same weights."""
    config = demo_config(demo_root, steps=3).copy(
        pretrained_model_name_or_path="tiny-sdxl", models_root=str(tmp_path), model_name="xl",
        seed=3, train_batch_size=1, save_every_steps=0, save_preview_every=0,
        save_preview_every_steps=0, train_text_encoder=True)
    out = launch(save_params(config, tmp_path / "xl.json"), tmp_path / "digests")
    assert out.stdout.count("steps=3 stopped=False") == 2
    digests = {p.read_text() for p in (tmp_path / "digests").iterdir()}
    assert len(digests) == 1
    assert (tmp_path / "dreambooth" / "xl" / "model" / "text_encoder_2").is_dir()
