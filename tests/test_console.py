"""What a command-line user sees and gets: quiet output (colab_dreambooth.console) and files
with ordinary permissions (colab_dreambooth.files)."""

from __future__ import annotations

import io
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from colab_dreambooth.console import TqdmHandler
from colab_dreambooth.files import temp_file_beside

REPO = Path(__file__).resolve().parents[1]


def test_log_lines_are_not_glued_onto_a_progress_bar():
    stream = io.StringIO()
    logger = logging.getLogger("colab_dreambooth.test_console")
    handler = TqdmHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    try:
        with tqdm(total=3, file=stream, desc="Training", ascii=True) as bar:
            bar.update(1)
            logger.warning("a line of its own")
            bar.update(1)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    before = text[:text.index("WARNING a line of its own")]
    assert before.endswith("\r"), repr(text)  # the bar was cleared first, then redrawn
    assert "WARNING a line of its own\n" in text
    assert text.rindex("Training") > text.index("a line of its own")


def test_sample_no_progress_prints_only_the_results(tmp_path):
    """A real process: no library progress bar, no torchvision warning, no log noise."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    out = subprocess.run(
        [sys.executable, "-m", "colab_dreambooth", "sample", "tiny", "--prompt", "a toy",
         "--steps", "2", "--height", "64", "--width", "64", "--seed", "1", "--out",
         str(tmp_path), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "torchvision" not in out.stderr
    assert "%|" not in out.stderr and "it/s" not in out.stderr, out.stderr
    assert out.stdout.splitlines()[-1].endswith("(grid of 1 images)")


# ----------------------------------------------------------------------------- permissions
@pytest.fixture(params=[0o022, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_get_ordinary_permissions(umask, tmp_path):
    from colab_dreambooth.config.params import save_params
    from colab_dreambooth.config.settings import DreamBoothConfig
    from colab_dreambooth.files import save_folder_atomic
    from colab_dreambooth.models.lora_file import save_lora

    params = save_params(DreamBoothConfig(), tmp_path / "params.json")
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:  # as diffusers' save_pretrained does (safetensors: 0600)
        (tmp / "unet").mkdir()
        save_file({"w": torch.zeros(2)}, tmp / "unet" / "weights.safetensors")

    folder = save_folder_atomic(write, tmp_path / "model")
    lora = save_lora(tmp_path / "lora.safetensors", {"w": torch.zeros(2)}, {})
    fd, name = temp_file_beside(tmp_path / "export.safetensors")
    os.close(fd)
    assert mode(params) == mode(lora) == mode(Path(name)) == 0o666 & ~umask
    assert mode(folder) == mode(folder / "unet") == 0o777 & ~umask
    assert mode(folder / "unet" / "weights.safetensors") == 0o666 & ~umask
    plain = tmp_path / "plain"
    plain.write_text("written the usual way")
    assert mode(params) == mode(plain)


def test_export_gets_ordinary_permissions(umask, tmp_path):
    from colab_dreambooth.models.single_file.export import export_single_file
    from colab_dreambooth.models.tiny import tiny_model_path

    report = export_single_file(tiny_model_path(), tmp_path / "model.safetensors",
                                progress=False)
    assert mode(report.path) == 0o666 & ~umask
