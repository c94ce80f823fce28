"""Every subcommand's known error paths end in one clear ``error:`` line and exit code 1,
never a traceback; a stopped run exits 130 (README: exit codes).

Most cases run in-process (``cli.main``); the two that matter most to scripts run as real
processes: a run stopped with Ctrl-C (SIGINT), and a new run refused beside it.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colab_dreambooth import cli
from colab_dreambooth.config.params import save_params
from colab_dreambooth.training.checkpoints import latest_checkpoint
from colab_dreambooth.training.train import train

REPO = Path(__file__).resolve().parents[1]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == cli.EXIT_ERROR, out + err
    assert err.startswith("error: "), err
    assert "Traceback" not in out + err
    for fragment in fragments:
        assert fragment.lower() in err.lower(), (fragment, err)


@pytest.fixture
def params(tiny_config, tmp_path) -> Path:
    return save_params(tiny_config.copy(max_train_steps=4, save_preview_every=0,
                                        save_preview_every_steps=0), tmp_path / "params.json")


# ----------------------------------------------------------------------------- input files
@pytest.mark.parametrize("command", ["train", "prompts", "class-images"])
def test_config_file_problems(command, tmp_path, capsys, no_model_loading):
    code, out, err = run(capsys, command, "--config", tmp_path / "nope.json")
    assert_clean_error(code, out, err, "nope.json", "file not found")
    broken = tmp_path / "broken.json"
    broken.write_text('{"learning_rate": 1e-6,}', encoding="utf-8")
    code, out, err = run(capsys, command, "--config", broken)
    assert_clean_error(code, out, err, "not valid JSON", "line 1")
    code, out, err = run(capsys, command, "--config", tmp_path)  # a folder
    assert code == cli.EXIT_ERROR and "Traceback" not in out + err


def test_env_with_a_missing_config(tmp_path, capsys):
    code, out, err = run(capsys, "env", "--config", tmp_path / "nope.json")
    assert_clean_error(code, out, err, "nope.json")


def test_mistyped_local_model_path_is_not_a_hub_error(tiny_config, tmp_path, capsys,
                                                      no_model_loading, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("models/sd15-diffusers", "./sd15", "models/dreambooth/x/modle"):
        config = tiny_config.copy(pretrained_model_name_or_path=name)
        path = save_params(config, tmp_path / "p.json")
        code, out, err = run(capsys, "train", "--config", path)
        assert_clean_error(code, out, err, "does not exist")
        assert "Hub" not in err.split("does not exist")[0], err
        code, out, err = run(capsys, "sample", name, "--prompt", "x", "--out", tmp_path / "s")
        assert_clean_error(code, out, err)
        assert "download" not in err, err


# ----------------------------------------------------------------------------- data and prompts
def test_prompts_without_a_concept(tiny_config, tmp_path, capsys):
    path = save_params(tiny_config.copy(concepts_list=[]), tmp_path / "p.json")
    code, out, err = run(capsys, "prompts", "--config", path)
    assert_clean_error(code, out, err, "no concept")


def test_class_prompt_holding_the_instance_token(tiny_config, tmp_path, capsys,
                                                 no_model_loading):
    concept = tiny_config.concepts_list[0]
    concept.instance_token, concept.class_prompt = "zwx", "a photo of zwx toy"
    path = save_params(tiny_config, tmp_path / "p.json")
    for command in ("train", "prompts"):
        code, out, err = run(capsys, command, "--config", path)
        assert_clean_error(code, out, err, "instance token")
    code, out, err = run(capsys, "check-data", "--config", path)
    assert code == 1 and "instance token" in out and "Traceback" not in out + err


def test_check_data_warnings_alone_exit_0_unless_strict(tiny_config, demo_root, tmp_path,
                                                        capsys):
    import shutil

    folder = tmp_path / "photos"
    shutil.copytree(demo_root / "data" / "instance", folder)
    png = sorted(folder.glob("*.png"))[0]
    png.rename(png.with_suffix(".jpg"))  # a PNG named .jpg: a warning
    code, out, _ = run(capsys, "check-data", folder, "--resolution", "128")
    assert code == 0 and "0 error(s), 1 warning(s)" in out
    code, out, _ = run(capsys, "check-data", folder, "--resolution", "128", "--strict")
    assert code == 1
    code, out, _ = run(capsys, "check-data", folder, "--resolution", "512")
    assert code == 1 and "--resolution" in out  # the too-small hint names the option


def test_check_data_with_config_finds_caption_problems_prompts_would_reject(
        tiny_config, demo_root, tmp_path, capsys):
    import shutil

    folder = tmp_path / "photos"
    shutil.copytree(demo_root / "data" / "instance", folder)
    for caption in folder.glob("*.txt"):
        caption.write_text("", encoding="utf-8")  # empty captions with a [filewords] prompt
    concept = tiny_config.concepts_list[0]
    concept.instance_data_dir, concept.instance_prompt = str(folder), "[filewords]"
    path = save_params(tiny_config, tmp_path / "p.json")
    code, _, err = run(capsys, "prompts", "--config", path)
    assert code == 1
    rejected = err.splitlines()[1].strip("- ")  # the first problem prompts names
    code, out, _ = run(capsys, "check-data", "--config", path)
    assert code == 1 and rejected in out, (rejected, out)


# ----------------------------------------------------------------------------- outputs
def test_model_stages_with_missing_inputs(tmp_path, capsys):
    missing = tmp_path / "missing"
    cases = [
        (["sample", missing / "model", "--prompt", "x", "--out", tmp_path / "s"], "not found"),
        (["sample", "tiny", "--lora", missing / "l.safetensors", "--prompt", "x", "--out",
          tmp_path / "s"], "LoRA file"),
        (["model-card", missing], "params.json"),
        (["create-model", missing / "m.safetensors", tmp_path / "out"], "m.safetensors"),
        (["export", missing, tmp_path / "x.safetensors"], str(missing)),
        (["dehydrate", missing, "tiny", tmp_path / "d.safetensors"], str(missing)),
        (["rehydrate", missing / "d.safetensors", "tiny", tmp_path / "r"], "d.safetensors"),
    ]
    for argv, fragment in cases:
        code, out, err = run(capsys, *argv)
        assert_clean_error(code, out, err, fragment)


def test_garbage_single_file(tmp_path, capsys):
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    code, out, err = run(capsys, "create-model", garbage, tmp_path / "out")
    assert_clean_error(code, out, err, "model.safetensors")


def test_export_never_overwrites_without_asking(tmp_path, capsys):
    from colab_dreambooth.models.tiny import tiny_model_path

    out_file = tmp_path / "mine.safetensors"
    out_file.write_bytes(b"the user's file")
    code, out, err = run(capsys, "export", tiny_model_path(), out_file)
    assert_clean_error(code, out, err, "--overwrite")
    assert out_file.read_bytes() == b"the user's file"


def test_demo_into_a_file(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, out, err = run(capsys, "demo", "--out", blocker, "--steps", "1")
    assert code == cli.EXIT_ERROR and err.startswith("error: ") and "Traceback" not in err


# ----------------------------------------------------------------------------- resume
def test_resume_errors(tiny_config, tmp_path, capsys):
    config = tiny_config.copy(max_train_steps=6, save_every_steps=0, use_ema=False,
                              save_preview_every=0, save_preview_every_steps=0)
    stopped = train(config, progress=False,
                    on_step=lambda step, loss, lr: step == 2 and os.kill(os.getpid(),
                                                                         signal.SIGINT))
    assert stopped.stopped_early and stopped.checkpoint is not None
    capsys.readouterr()  # the run's own progress bars
    path = save_params(config, tmp_path / "p.json")
    code, out, err = run(capsys, "train", "--config", path)  # would bury the stopped run
    assert_clean_error(code, out, err, "--resume")
    assert config.train_batch_size == 2
    code, out, err = run(capsys, "train", "--config", path, "--resume",
                         "--train-batch-size", "1")
    assert_clean_error(code, out, err, "train_batch_size")


def test_stopped_run_exits_130_and_a_new_run_is_refused_cleanly(tiny_config, tmp_path):
    """Ctrl-C on a real ``train`` process: the step finishes, checkpoint and model are
    written, and the exit code says the run did not finish, so ``train && export`` stops."""
    config = tiny_config.copy(max_train_steps=400, save_every_steps=1, use_ema=False,
                              save_preview_every=0, save_preview_every_steps=0)
    path = save_params(config, tmp_path / "p.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "colab_dreambooth", "train", "--config", str(path)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    checkpoints = tmp_path / "dreambooth" / "test-model" / "checkpoints"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None \
                and latest_checkpoint(checkpoints) is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == cli.EXIT_STOPPED, err[-3000:]
    assert "Training stopped early" in out and "Traceback" not in err
    info = json.loads((tmp_path / "dreambooth" / "test-model" / "model" /
                       "training_info.json").read_text())
    assert info["steps"] < info["total_steps"] == 400
    # what it wrote has the permissions of any file the user writes (safetensors makes 0600)
    from colab_dreambooth.files import file_mode

    written = [*latest_checkpoint(checkpoints).iterdir(),
               *(tmp_path / "dreambooth" / "test-model" / "model").rglob("*.safetensors")]
    assert written and all(stat.S_IMODE(p.stat().st_mode) == file_mode() for p in written)

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == cli.EXIT_ERROR
    assert again.stderr.splitlines()[-1].startswith("error: ") or "error: " in again.stderr
    assert "Traceback" not in again.stderr and "--resume" in again.stderr
