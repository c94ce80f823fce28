"""Tests for validation (colab_dreambooth.config.validation): every problem at once, each naming
its field and what to do.

Everything runs on real files in ``tmp_path``; nothing is mocked.
"""

from __future__ import annotations

import pytest
from config_helpers import make_images, only_problem, wheres, write_json

from colab_dreambooth.config.concept import Concept
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.config.validation import validate
from colab_dreambooth.errors import ConfigError, Problem
from colab_dreambooth.runtime.device import DeviceInfo

T4 = DeviceInfo("cuda", "Tesla T4", 15, False, 1)
A100 = DeviceInfo("cuda", "NVIDIA A100-SXM4-40GB", 40, True, 1)
CPU = DeviceInfo.cpu()


# ============================================================================= validate
def test_valid_config_has_no_problems(valid_config):
    assert validate(valid_config, CPU) == []
    assert validate(valid_config, T4) == []
    assert validate(valid_config, A100) == []
    assert validate(valid_config.copy(pretrained_model_name_or_path="org/some-model"), T4) == []


def test_demo_config_is_valid(tiny_config):
    assert validate(tiny_config, CPU) == []


@pytest.mark.parametrize("token", ["sks dog", "a photo of sks", "sks,shs", "sks\tdog"])
def test_instance_token_with_spaces(valid_config, token):
    valid_config.concepts_list[0].instance_token = token
    problems = validate(valid_config, CPU)
    assert "one rare word" in only_problem(problems, "concept 1 instance_token").message


@pytest.mark.parametrize("class_prompt,bad", [
    ("photo of a sks dog", True), ("Sks dog", True), ("photo of SKS, dog", True),
    ("a dog that asks", False), ("sksdog", False), ("photo of a dog", False)])
def test_class_prompt_holding_the_instance_token(valid_config, class_prompt, bad):
    valid_config.concepts_list[0].class_prompt = class_prompt
    problems = validate(valid_config, CPU)
    if bad:
        assert "instance token 'sks'" in only_problem(problems,
                                                      "concept 1 class_prompt").message
    else:
        assert problems == []


def test_cpu_only_with_8bit_adam(valid_config):
    problems = validate(valid_config.copy(use_cpu=True, use_8bit_adam=True), CPU)
    assert wheres(problems) == ["use_8bit_adam"]
    assert "CUDA" in problems[0].message
    assert validate(valid_config.copy(use_cpu=True, use_8bit_adam=None), CPU) == []
    assert validate(valid_config.copy(use_cpu=True, use_8bit_adam=False), CPU) == []
    assert validate(valid_config.copy(use_8bit_adam=True), T4) == []


def test_bf16_on_a_gpu_without_bf16(valid_config):
    config = valid_config.copy(mixed_precision="bf16")
    problems = validate(config, T4)
    assert wheres(problems) == ["mixed_precision"]
    assert "Tesla T4" in problems[0].message and "fp16" in problems[0].message
    assert validate(config, A100) == []
    assert validate(config, CPU) == []
    assert validate(config.copy(use_cpu=True), T4) == []


def test_steps_and_epochs_both_blank(valid_config):
    problems = validate(valid_config.copy(max_train_steps=None, num_train_epochs=None), CPU)
    assert wheres(problems) == ["max_train_steps"]
    assert validate(valid_config.copy(max_train_steps=None, num_train_epochs=5), CPU) == []
    assert validate(valid_config.copy(max_train_steps=5, num_train_epochs=None), CPU) == []


def test_prior_preservation_needs_a_class_prompt(valid_config, tmp_path):
    concept = valid_config.concepts_list[0]
    concept.class_prompt = "  "
    problem = only_problem(validate(valid_config, CPU), "concept 1 class_prompt")
    assert "prior preservation" in problem.message
    concept.num_class_images = 0
    assert validate(valid_config, CPU) == []  # no class images: no prior preservation
    concept.class_data_dir = str(make_images(tmp_path / "class", 2))
    assert wheres(validate(valid_config, CPU)) == ["concept 1 class_prompt"]


@pytest.mark.parametrize("changes,where,words", [
    ({"learning_rate": -1.0}, "learning_rate", "below the minimum 0"),
    ({"learning_rate": 2.0}, "learning_rate", "above the maximum 1"),
    ({"train_batch_size": 0}, "train_batch_size", "below the minimum 1"),
    ({"resolution": 500}, "resolution", "not a multiple of 64"),
    ({"resolution": 32}, "resolution", "below the minimum 64"),
    ({"seed": -5}, "seed", "below the minimum 0"),
    ({"stop_text_encoder": 1.5}, "stop_text_encoder", "above the maximum 1"),
    ({"learning_rate": float("nan")}, "learning_rate", "finite"),
    ({"lr_scheduler": "fast"}, "lr_scheduler", "'constant_with_warmup'"),
    ({"mixed_precision": "fp8"}, "mixed_precision", "'no', 'fp16', 'bf16'"),
    ({"attention": "sdp"}, "attention", "'xformers'"),
    ({"train_batch_size": "2"}, "train_batch_size", "whole number"),
])
def test_out_of_range_and_bad_choices(valid_config, changes, where, words):
    problems = validate(valid_config.copy(**changes), CPU)
    assert wheres(problems) == [where]
    assert words in problems[0].message


def test_concept_field_range_and_choice(valid_config):
    concept = valid_config.concepts_list[0]
    concept.num_class_images = -1
    concept.file_prompt_contents = "Tokens"
    concept.class_infer_steps = 0
    problems = validate(valid_config, CPU)
    assert sorted(wheres(problems)) == ["concept 1 class_infer_steps",
                                        "concept 1 file_prompt_contents",
                                        "concept 1 num_class_images"]
    assert "'Description'" in only_problem(problems, "concept 1 file_prompt_contents").message


def test_missing_instance_folder_names_the_concept(valid_config, instance_dir):
    windows = "E:\\dev\\sd_db\\clothes_samples\\bossdyn"
    valid_config.concepts_list.append(Concept(instance_prompt="a man wearing bossdyn pants",
                                              instance_data_dir=windows))
    problems = validate(valid_config, CPU)
    problem = only_problem(problems, "concept 2 instance_data_dir")
    assert windows in problem.message and "does not exist" in problem.message
    assert wheres(problems) == ["concept 2 instance_data_dir"]
    assert validate(valid_config, CPU, check_paths=False) == []


def test_blank_instance_prompt_and_folder(valid_config):
    valid_config.concepts_list.append(Concept())
    problems = validate(valid_config, CPU)
    assert sorted(wheres(problems)) == ["concept 2 instance_data_dir",
                                        "concept 2 instance_prompt"]


def test_missing_sample_template(valid_config, tmp_path):
    valid_config.concepts_list[0].save_sample_template = str(tmp_path / "prompts.txt")
    assert wheres(validate(valid_config, CPU)) == ["concept 1 save_sample_template"]
    (tmp_path / "prompts.txt").write_text("photo of sks dog\n", encoding="utf-8")
    assert validate(valid_config, CPU) == []


@pytest.mark.parametrize("base", ["E:\\dev\\models\\dreambooth\\x\\working", "/no/such/model",
                                  "./missing-model", "~/no-such-dir-xyz/model",
                                  "v1-5-pruned.safetensors", "model.ckpt"])
def test_missing_local_base_model(valid_config, base):
    problems = validate(valid_config.copy(pretrained_model_name_or_path=base), CPU)
    problem = only_problem(problems, "pretrained_model_name_or_path")
    assert base in problem.message and "does not exist" in problem.message
    assert validate(valid_config.copy(pretrained_model_name_or_path=base), CPU,
                    check_paths=False) == []


def test_existing_local_base_model_and_src(valid_config, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    assert validate(valid_config.copy(pretrained_model_name_or_path=str(model)), CPU) == []
    problems = validate(valid_config.copy(src="E:\\models\\v1-5.safetensors"), CPU)
    assert wheres(problems) == ["src"]  # src is the base model when set
    checkpoint = tmp_path / "v1-5.safetensors"
    checkpoint.write_bytes(b"\0")
    assert validate(valid_config.copy(src=str(checkpoint)), CPU) == []
    assert wheres(validate(valid_config.copy(pretrained_model_name_or_path=" "), CPU)) == [
        "pretrained_model_name_or_path"]


def test_no_concepts(valid_config, tmp_path):
    problems = validate(valid_config.copy(concepts_list=[]), CPU)
    assert wheres(problems) == ["concepts_list"]
    assert "no concept" in problems[0].message
    concepts = write_json(tmp_path / "concepts.json", [{"instance_prompt": "sks dog"}])
    assert validate(valid_config.copy(concepts_list=[], concepts_path=str(concepts)), CPU) == []


def test_missing_concepts_path(valid_config, tmp_path):
    problems = validate(valid_config.copy(concepts_list=[],
                                          concepts_path=str(tmp_path / "nope.json")), CPU)
    assert wheres(problems) == ["concepts_path"]
    assert "nope.json" in problems[0].message


def test_wrongly_typed_values_are_problems_not_crashes(valid_config):
    config = valid_config.copy(resolution="512", concepts_list=[
        Concept(instance_prompt=None, instance_data_dir=None, class_prompt=5,
                num_class_images="10")])
    problems = validate(config, CPU)
    assert {"resolution", "concept 1 instance_prompt", "concept 1 instance_data_dir",
            "concept 1 class_prompt", "concept 1 num_class_images"} <= set(wheres(problems))
    assert wheres(validate(valid_config.copy(concepts_list=None), CPU)) == ["concepts_list"]
    assert wheres(validate(valid_config.copy(concepts_list=["x"]), CPU)) == ["concept 1"]


def test_several_problems_are_all_returned(valid_config):
    config = valid_config.copy(
        learning_rate=-1.0, resolution=500, lr_scheduler="fast", mixed_precision="bf16",
        max_train_steps=None, num_train_epochs=None, use_cpu=True, use_8bit_adam=True,
        pretrained_model_name_or_path="E:\\models\\missing")
    concept = config.concepts_list[0]
    concept.instance_token = "sks dog"
    concept.class_prompt = ""
    concept.instance_data_dir = "E:\\dev\\data"
    problems = validate(config, T4)
    assert sorted(wheres(problems)) == sorted([
        "learning_rate", "resolution", "lr_scheduler", "max_train_steps", "use_8bit_adam",
        "pretrained_model_name_or_path", "concept 1 instance_token", "concept 1 class_prompt",
        "concept 1 instance_data_dir"])  # bf16 is fine: use_cpu runs in fp32
    error = ConfigError(problems)
    assert error.problems == problems
    assert str(error).startswith(f"{len(problems)} problem(s)")
    assert "  - learning_rate: " in str(error)


def test_problem_str():
    assert str(Problem("concept 2 class_prompt", "blank")) == "concept 2 class_prompt: blank"


def test_output_folders_on_unmounted_google_drive(tmp_path, monkeypatch):
    """On Colab, checkpoints or models on /content/drive before Drive is mounted would land on
    the runtime's own disk (gone at the next disconnect): reported before training."""
    from colab_dreambooth.config.validation import validate
    from colab_dreambooth.runtime import environment as runtime

    drive = tmp_path / "content" / "drive"
    monkeypatch.setattr(runtime, "DRIVE_MOUNT", drive)
    monkeypatch.setattr(runtime, "on_colab", lambda: True)
    config = DreamBoothConfig(checkpoint_dir=str(drive / "MyDrive" / "ckpt"))
    problems = [p for p in validate(config, DeviceInfo.cpu()) if p.where == "checkpoint_dir"]
    assert len(problems) == 1 and "not mounted" in problems[0].message
    (drive / "MyDrive").mkdir(parents=True)  # mounted now
    assert not [p for p in validate(config, DeviceInfo.cpu()) if p.where == "checkpoint_dir"]
    monkeypatch.setattr(runtime, "on_colab", lambda: False)  # elsewhere: refused, saying why
    (drive / "MyDrive").rmdir()
    problems = [p for p in validate(config, DeviceInfo.cpu()) if p.where == "checkpoint_dir"]
    assert len(problems) == 1 and "only available on Colab" in problems[0].message
    # Concept folders too (class images are written there).
    config = DreamBoothConfig(concepts_list=[Concept(class_data_dir=str(drive / "MyDrive" / "c"))])
    wheres = [p.where for p in validate(config, DeviceInfo.cpu()) if "Drive" in p.message]
    assert wheres == ["concept 1 class_data_dir"]


def test_checkpoint_hub_repo_must_be_hf_url():
    from colab_dreambooth.config.validation import validate

    def hub_problems(value):
        config = DreamBoothConfig(checkpoint_hub_repo=value)
        return [p for p in validate(config, DeviceInfo.cpu(), check_paths=False)
                if p.where == "checkpoint_hub_repo"]

    assert hub_problems("") == [] and hub_problems("hf://me/ckpts") == []
    for bad in ("me/ckpts", "hf://just-a-name", "/content/drive/x"):
        [problem] = hub_problems(bad)
        assert "hf://<user or org>/<repo name>" in problem.message
