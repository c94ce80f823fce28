"""Runs in real processes for the tests: one trained whole, one killed and resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from colab_dreambooth.config.params import save_params
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.training.checkpoints import latest_checkpoint, read_state

REPO = Path(__file__).resolve().parents[1]


def train_whole_and_killed(base: DreamBoothConfig, folder: Path, *, kill_after: int = 4
                           ) -> tuple[Path, Path]:
    """Train ``base`` in a process as ``whole``, and again as ``killed``: SIGKILL once a
    checkpoint of step ``kill_after`` or later is complete, then ``train --resume``.

    Returns the two runs' folders (``<models root>/dreambooth/whole`` and ``.../killed``);
    ``base`` saves checkpoints often enough and writes into ``folder``.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))

    def command(name: str, *extra: str) -> list[str]:
        params = save_params(base.copy(model_name=name), folder / f"{name}.json")
        return [sys.executable, "-m", "colab_dreambooth", "train", "--config", str(params),
                *extra]

    subprocess.run(command("whole"), env=env, check=True, capture_output=True, timeout=600)
    runs = Path(base.models_root) / "dreambooth"
    root = runs / "killed" / "checkpoints"
    proc = subprocess.Popen(command("killed"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            found = latest_checkpoint(root)
            if found is not None and read_state(found)["progress"]["step"] >= kill_after:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = read_state(latest_checkpoint(root))["progress"]["step"]
    assert kill_after <= killed_at < base.max_train_steps
    assert not (runs / "killed" / "model").exists() and not (runs / "killed" / "lora").exists()
    out = subprocess.run(command("killed", "--resume"), env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Resuming from" in out.stderr
    return runs / "whole", runs / "killed"
