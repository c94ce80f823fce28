"""Tests for the command line (colab_dreambooth.cli), run in-process and once as a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from colab_dreambooth import cli
from colab_dreambooth.cli.options import config_from_args
from colab_dreambooth.config.params import CONCEPT_FIELDS, load_params, params_to_dict, save_params
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.demo import demo_config, make_demo_data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def demo(tmp_path):
    """Demo data in ``tmp_path/data`` and its parameters JSON ``tmp_path/params.json``."""
    make_demo_data(tmp_path / "data")
    config = demo_config(tmp_path)
    return tmp_path, config, save_params(config, tmp_path / "params.json")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


# ----------------------------------------------------------------------------- help
def test_help_as_a_subprocess():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, "-m", "colab_dreambooth", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: colab-dreambooth")
    for command in ("train", "check-data", "prompts", "params", "demo"):
        assert command in proc.stdout


def test_train_help_lists_every_field_as_an_option(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--learning-rate", "--hflip", "--max-train-steps", "--save-every-steps",
                   "--resolution", "--lr-scheduler", "--mixed-precision"):
        assert option in out
    assert "Learning rate" in out and "true|false" in out


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2


# ----------------------------------------------------------------------------- check-data
def test_check_data_good_folder(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        noise_image(320, 300, seed=i).save(folder / f"me_{i}.jpg", quality=90)
        (folder / f"me_{i}.txt").write_text("a photo of a man", encoding="utf-8")
    code, out, err = run(capsys, "check-data", folder)  # default resolution 512
    assert code == 0, out + err
    assert out.splitlines() == ["1 folder(s) checked: 0 error(s), 0 warning(s)."]


def test_check_data_bad_folder_names_every_bad_file(demo, capsys):
    root, _, _ = demo
    folder = root / "data" / "instance"
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    small = folder / "small.png"
    noise_image(40, 40).save(small)

    code, out, err = run(capsys, "check-data", folder, "--resolution", "128")
    assert code == 1
    error_lines = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert len(error_lines) == 2, out
    assert any(str(corrupt) in line for line in error_lines)
    [small_line] = [line for line in error_lines if str(small) in line]
    assert "40x40" in small_line and "resolution is 128" in small_line
    assert "1 folder(s) checked: 2 error(s), 0 warning(s)." in out


def test_check_data_default_resolution_is_512(demo, capsys):
    root, _, _ = demo
    code, out, _ = run(capsys, "check-data", root / "data" / "instance")  # 128 px images
    assert code == 1
    assert "is 128x128 pixels but the resolution is 512" in out
    assert "1 folder(s) checked: 7 error(s), 0 warning(s)." in out  # 6 images + the folder
    code, out, _ = run(capsys, "check-data", root / "data" / "instance", "--resolution", "256")
    assert code == 0


def test_check_data_with_config_checks_the_concept_folders(demo, capsys):
    root, config, params = demo
    code, out, err = run(capsys, "check-data", "--config", params)
    assert code == 0, out + err
    assert "2 folder(s) checked: 0 error(s), 0 warning(s)." in out

    broken = root / "data" / "class" / "toy_03.png"
    broken.write_bytes(b"")
    mislabelled = root / "data" / "instance" / "star_00.jpg"
    (root / "data" / "instance" / "star_00.png").rename(mislabelled)
    code, out, err = run(capsys, "check-data", "--config", params)
    assert code == 1
    assert re.search(rf"^ERROR +{re.escape(str(broken))}: is empty", out, re.M), out
    assert re.search(rf"^WARNING +{re.escape(str(mislabelled))}: contains PNG data", out, re.M)
    # ... and, as train would, that the class folder now lacks one of its 12 images
    assert re.search(r"^WARNING +concept 1: the class folder .* holds 11 usable images", out, re.M)
    assert "2 folder(s) checked: 1 error(s), 2 warning(s)." in out


def test_check_data_with_config_uses_its_resolution(demo, capsys):
    root, config, _ = demo
    params = save_params(config.copy(resolution=512), root / "big.json")
    code, out, _ = run(capsys, "check-data", "--config", params)
    assert code == 1  # 128 px images are below half of 512
    assert "resolution is 512" in out
    code, out, _ = run(capsys, "check-data", "--config", params, "--resolution", "256")
    assert code == 0


def test_check_data_with_config_reports_a_blank_instance_folder(demo, capsys, monkeypatch):
    root, config, _ = demo
    config.concepts_list[0].instance_data_dir = ""
    params = save_params(config, root / "blank.json")
    monkeypatch.chdir(root / "data" / "instance")  # must not be checked in its place
    code, out, _ = run(capsys, "check-data", "--config", params)
    assert code == 1
    assert "concept 1: the Instance dataset directory is blank" in out
    assert "1 folder(s) checked: 1 error(s), 0 warning(s)." in out  # the class folder


def test_check_data_missing_folder(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    code, out, _ = run(capsys, "check-data", missing)
    assert code == 1
    assert f"{missing}: folder does not exist" in out


def test_check_data_missing_concept_folder_from_config(demo, capsys):
    root, config, _ = demo
    config.concepts_list[0].instance_data_dir = r"E:\dev\photos"
    params = save_params(config, root / "other-machine.json")
    code, out, _ = run(capsys, "check-data", "--config", params)
    assert code == 1
    assert "E:\\dev\\photos" in out and "does not exist" in out


def test_check_data_needs_folders_or_config(capsys):
    code, _, err = run(capsys, "check-data")
    assert code == 2
    assert "name image folders or --config" in err


def test_check_data_missing_config_file(tmp_path, capsys):
    code, _, err = run(capsys, "check-data", "--config", tmp_path / "nope.json")
    assert code == 1
    assert "nope.json" in err and "file not found" in err


# ----------------------------------------------------------------------------- prompts
def test_prompts_prints_every_image_and_its_prompt(demo, capsys):
    root, _, params = demo
    code, out, err = run(capsys, "prompts", "--config", params)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"Concept 1 ({root / 'data' / 'instance'})"
    instance_lines = [line for line in lines if line.startswith("  instance  ")]
    class_lines = [line for line in lines if line.startswith("  class     ")]
    assert len(instance_lines) == 6 and len(class_lines) == 12
    for i, line in enumerate(instance_lines):
        caption = (root / "data" / "instance" / f"star_{i:02d}.txt").read_text()
        name, prompt = line.split()[1], " ".join(line.split()[2:])
        assert name == f"star_{i:02d}.png"
        assert prompt == caption.replace("a photo of a toy", "a photo of zwx toy")
    for i, line in enumerate(class_lines):
        caption = (root / "data" / "class" / f"toy_{i:02d}.txt").read_text()
        assert line.split()[1] == f"toy_{i:02d}.png"
        assert " ".join(line.split()[2:]) == caption
    assert "WARNING" not in out


def test_prompts_before_class_images_exist(demo, capsys):
    root, config, _ = demo
    config.concepts_list[0].class_data_dir = ""  # to be generated into classifiers/concept_1
    params = save_params(config, root / "gen.json")
    code, out, _ = run(capsys, "prompts", "--config", params)
    assert code == 0
    assert sum(line.startswith("  instance  ") for line in out.splitlines()) == 6
    assert "  class  " not in out
    folder = root / "dreambooth" / "demo-star" / "classifiers" / "concept_1"
    assert re.search(rf"^WARNING .*{re.escape(str(folder))} holds 0 usable images", out, re.M)


def test_prompts_with_a_bad_caption_exits_1(demo, capsys):
    root, _, params = demo
    caption = root / "data" / "instance" / "star_02.txt"
    caption.write_text("a picture of a ball", encoding="utf-8")
    code, out, err = run(capsys, "prompts", "--config", params)
    assert code == 1
    assert err.startswith("error: 1 problem(s) with the training data")
    assert str(caption) in err


# ----------------------------------------------------------------------------- params
def test_params_writes_the_defaults_and_an_example_concept(tmp_path, capsys):
    out_file = tmp_path / "sub" / "out.json"
    code, out, _ = run(capsys, "params", out_file)
    assert code == 0
    assert str(out_file) in out
    loaded = load_params(out_file)
    assert loaded.copy(concepts_list=[]) == DreamBoothConfig()
    data = json.loads(out_file.read_text(encoding="utf-8"))
    assert data["learning_rate"] == 2e-6 and data["max_train_steps"] is None
    (concept,) = data["concepts_list"]
    assert concept["instance_data_dir"] == "my-photos" and concept["instance_token"] == "zwx"
    assert set(concept) == set(CONCEPT_FIELDS)  # every concept key, to edit
    # relative folders mean the folder beside the file, whatever the current folder
    assert loaded.concepts_list[0].instance_data_dir == str(tmp_path / "sub" / "my-photos")


def test_params_never_overwrites_without_asking(tmp_path, capsys):
    out_file = tmp_path / "mine.json"
    out_file.write_text('{"learning_rate": 1e-6}', encoding="utf-8")
    code, out, err = run(capsys, "params", out_file)
    assert code == 1
    assert err.startswith("error: ") and "already exists" in err and "--overwrite" in err
    assert out_file.read_text(encoding="utf-8") == '{"learning_rate": 1e-6}'
    code, _, _ = run(capsys, "params", out_file, "--overwrite")
    assert code == 0 and load_params(out_file).learning_rate == 2e-6


# ----------------------------------------------------------------------------- train
def test_misspelled_key_fails_before_any_model_loads(demo, capsys, no_model_loading):
    root, config, _ = demo
    data = params_to_dict(config)
    data["learning_rat"] = 1e-4
    bad = root / "bad.json"
    bad.write_text(json.dumps(data), encoding="utf-8")
    code, out, err = run(capsys, "train", "--config", bad)
    assert code == 1
    assert "unknown key 'learning_rat': did you mean 'learning_rate'?" in err
    assert err.startswith("error: ")
    assert not (root / "dreambooth").exists()


def test_bad_data_fails_before_any_model_loads(demo, capsys, no_model_loading):
    root, _, params = demo
    empty = root / "data" / "instance" / "star_01.png"
    empty.write_bytes(b"")
    code, _, err = run(capsys, "train", "--config", params, "--max-train-steps", "3")
    assert code == 1
    assert str(empty) in err and "empty (0 bytes)" in err


def test_overrides_reach_the_config(demo):
    _, config, params = demo
    args = cli.build_parser().parse_args([
        "train", "--config", str(params), "--learning-rate", "1e-4", "--hflip", "false",
        "--max-train-steps", "3", "--save-every-steps", "0", "--lr-scheduler", "cosine",
        "--train-text-encoder", "no", "--resolution", "128", "--model-name", "other"])
    got = config_from_args(args)
    assert got.learning_rate == 1e-4
    assert got.hflip is False and config.hflip is True
    assert got.max_train_steps == 3
    assert got.save_every_steps == 0
    assert got.lr_scheduler == "cosine"
    assert got.train_text_encoder is False
    assert got.resolution == 128
    assert got.model_name == "other"
    assert got == config.copy(learning_rate=1e-4, hflip=False, max_train_steps=3,
                              save_every_steps=0, lr_scheduler="cosine",
                              train_text_encoder=False, resolution=128, model_name="other")


def test_no_overrides_gives_the_file(demo):
    _, config, params = demo
    args = cli.build_parser().parse_args(["prompts", "--config", str(params)])
    assert config_from_args(args) == config == load_params(params)


@pytest.mark.parametrize("text,value", [("true", True), ("On", True), ("1", True),
                                        ("FALSE", False), ("off", False), ("0", False)])
def test_boolean_options(demo, text, value):
    _, _, params = demo
    args = cli.build_parser().parse_args(["train", "--config", str(params), "--hflip", text])
    assert config_from_args(args).hflip is value


def test_bad_option_values_are_usage_errors(demo, capsys):
    _, _, params = demo
    for option, value in (("--hflip", "maybe"), ("--learning-rate", "fast"),
                          ("--max-train-steps", "3.5")):
        with pytest.raises(SystemExit) as info:
            cli.build_parser().parse_args(["train", "--config", str(params), option, value])
        assert info.value.code == 2
        assert option in capsys.readouterr().err


def test_train_on_the_demo(demo, capsys):
    root, _, params = demo
    code, out, err = run(capsys, "train", "--config", params, "--max-train-steps", "3",
                         "--save-every-steps", "0")
    assert code == 0, err
    assert "Training finished after 3/3 steps (seed 1234)." in out
    [line] = [line for line in out.splitlines() if line.startswith("Trained model")]
    model_dir = Path(line.split(": ", 1)[1])
    assert model_dir.is_dir()
    assert (model_dir / "model_index.json").is_file()
    assert model_dir.is_relative_to(root / "dreambooth" / "demo-star")
    for part in ("unet", "text_encoder", "vae", "tokenizer"):
        assert (model_dir / part).is_dir(), part


def test_optional_fields_can_be_blanked(demo):
    """A JSON that sets Training Steps can switch to epochs from the command line."""
    _, config, params = demo
    assert config.max_train_steps == 60 and config.seed == 1234
    args = cli.build_parser().parse_args(["train", "--config", str(params), "--max-train-steps",
                                     "none", "--seed", "None", "--gradient-checkpointing", "auto",
                                     "--num-train-epochs", "7"])
    got = config_from_args(args)
    assert got.max_train_steps is None and got.seed is None
    assert got.gradient_checkpointing is None and got.num_train_epochs == 7
    args = cli.build_parser().parse_args(["train", "--config", str(params), "--use-8bit-adam",
                                         "yes"])
    assert config_from_args(args).use_8bit_adam is True


def test_invalid_override_is_reported_before_any_model_loads(demo, capsys, no_model_loading):
    _, _, params = demo
    code, _, err = run(capsys, "train", "--config", params, "--lr-scheduler", "nope",
                       "--learning-rate", "-1")
    assert code == 1
    assert "2 problem(s) with the configuration" in err
    assert "lr_scheduler: 'nope' is not one of" in err
    assert "learning_rate" in err


def test_readme_concept_example_loads_and_resolves_beside_the_file(tmp_path, monkeypatch):
    """The README's JSON example is a valid parameters file; its relative folder is the one
    beside the file, whatever the current folder."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```json\n(.*?)```", text, re.S).group(1)
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "params.json"
    path.write_text(block, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    config = load_params(path)
    (concept,) = config.concepts_list
    assert concept.instance_data_dir == str(tmp_path / "run" / "my-photos")
    assert concept.num_class_images == 50 and config.max_train_steps == 800


def test_demo_suggests_a_command_that_works_in_a_fresh_shell(monkeypatch):
    """Without the virtualenv activated, ``colab-dreambooth`` is not on PATH: the demo's hint
    names the script's path instead (or the bare name once it is on PATH)."""
    from colab_dreambooth.demo import command_name

    script = Path(sys.executable).parent / "colab-dreambooth"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    named = command_name()
    if script.exists():
        assert Path(named).resolve() == script.resolve()
        monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")
        assert command_name() == "colab-dreambooth"
    else:  # not installed with its script: the module form always works
        assert named.endswith("-m colab_dreambooth")


@pytest.mark.parametrize("command, settings", [
    (["export", "m", "out.safetensors"], "ExportSettings"),
    (["dehydrate", "m", "tiny", "out.safetensors"], "DehydrateSettings"),
    (["create-model", "m.safetensors", "out"], "CreateModelSettings"),
    (["sample", "m", "--prompt", "x", "--out", "s"], "SampleSettings"),
])
def test_model_command_options_default_to_their_settings(command, settings):
    """The options come from the settings dataclasses the notebook forms use too."""
    import dataclasses

    from colab_dreambooth.cli.options import settings_from_args
    from colab_dreambooth.config import commands

    cls = getattr(commands, settings)
    args = cli.build_parser().parse_args(command)
    assert settings_from_args(args, cls) == cls()
    assert dataclasses.fields(cls)  # every command has settings of its own


def test_export_defaults_to_fp16_as_the_release_form_does():
    from colab_dreambooth.publish.release import ReleaseSettings

    parser = cli.build_parser()
    assert parser.parse_args(["export", "m", "o.safetensors"]).fp16 is ReleaseSettings().fp16
    assert parser.parse_args(["export", "m", "o.safetensors"]).fp16 is True
    assert parser.parse_args(["export", "m", "o.safetensors", "--no-fp16"]).fp16 is False
    assert parser.parse_args(["export", "m", "o.safetensors", "--fp16"]).fp16 is True
