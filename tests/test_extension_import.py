"""Tests for reading the AUTOMATIC1111 extension's saved files
(colab_dreambooth.config.extension_import, through colab_dreambooth.config.params).

Everything runs on real files in ``tmp_path``; nothing is mocked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from config_helpers import make_images, only_problem, wheres, write_json

from colab_dreambooth.config.concept import Concept
from colab_dreambooth.config.params import (
    load_params,
    params_from_dict,
    read_params,
)
from colab_dreambooth.config.validation import validate
from colab_dreambooth.errors import ConfigError
from colab_dreambooth.runtime.device import DeviceInfo

T4 = DeviceInfo("cuda", "Tesla T4", 15, False, 1)
A100 = DeviceInfo("cuda", "NVIDIA A100-SXM4-40GB", 40, True, 1)
CPU = DeviceInfo.cpu()


# ============================================================================ the extension's files
def later_db_config(instance_dir: Path) -> dict:
    """A db_config.json as the extension's 2023-2025 versions write it (json.dump of its
    pydantic config: every key of DreamboothConfig, in its order)."""
    return {
        "weight_decay": 0.01,
        "attention": "xformers",
        "cache_latents": True,
        "clip_skip": 1,
        "concepts_list": [
            {
                "class_data_dir": "",
                "class_guidance_scale": 7.5,
                "class_infer_steps": 40,
                "class_negative_prompt": "",
                "class_prompt": "a photo of a dog",
                "class_token": "dog",
                "instance_data_dir": str(instance_dir),
                "instance_prompt": "a photo of sks dog",
                "instance_token": "sks",
                "is_valid": True,
                "n_save_sample": 1,
                "num_class_images_per": 2,
                "sample_seed": -1,
                "save_guidance_scale": 7.5,
                "save_infer_steps": 20,
                "save_sample_negative_prompt": "",
                "save_sample_prompt": "a photo of sks dog on the beach",
                "save_sample_template": "",
            },
            {
                "class_data_dir": "E:\\dev\\sd_db\\pants",
                "class_guidance_scale": 7.5,
                "class_infer_steps": 60,
                "class_negative_prompt": "blurry",
                "class_prompt": "a man wearing pants",
                "class_token": "",
                "instance_data_dir": "E:\\dev\\sd_db\\clothes_samples\\bossdyn",
                "instance_prompt": "a man wearing bossdyn pants",
                "instance_token": "bossdyn",
                "is_valid": False,
                "n_save_sample": 1,
                "num_class_images_per": 0,
                "sample_seed": 420,
                "save_guidance_scale": 7.5,
                "save_infer_steps": 40,
                "save_sample_negative_prompt": "",
                "save_sample_prompt": "",
                "save_sample_template": "",
            },
        ],
        "concepts_path": "",
        "custom_model_name": "",
        "deterministic": False,
        "disable_class_matching": False,
        "disable_logging": False,
        "ema_predict": False,
        "epoch": 12,
        "epoch_pause_frequency": 0,
        "epoch_pause_time": 0,
        "freeze_clip_normalization": False,
        "full_mixed_precision": True,
        "gradient_accumulation_steps": 1,
        "gradient_checkpointing": True,
        "gradient_set_to_none": True,
        "graph_smoothing": 50,
        "half_model": False,
        "has_ema": False,
        "hflip": False,
        "infer_ema": False,
        "initial_revision": 0,
        "input_pertubation": True,
        "learning_rate": 2e-06,
        "learning_rate_min": 1e-06,
        "lifetime_revision": 1450,
        "lora_learning_rate": 0.0001,
        "lora_model_name": "",
        "lora_txt_learning_rate": 5e-05,
        "lora_txt_rank": 4,
        "lora_unet_rank": 4,
        "lora_weight": 0.8,
        "lora_use_buggy_requires_grad": False,
        "lr_cycles": 1,
        "lr_factor": 0.5,
        "lr_power": 1.0,
        "lr_scale_pos": 0.5,
        "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 500,
        "max_token_length": 75,
        "min_snr_gamma": 0.0,
        "use_dream": False,
        "dream_detail_preservation": 0.5,
        "freeze_spectral_norm": False,
        "mixed_precision": "fp16",
        "model_dir": "E:\\dev\\models\\dreambooth\\x",
        "model_name": "x",
        "model_path": "E:\\dev\\models\\dreambooth\\x",
        "model_type": "v1x",
        "noise_scheduler": "DDPM",
        "num_train_epochs": 100,
        "offset_noise": 0,
        "optimizer": "8bit AdamW",
        "pad_tokens": True,
        "pretrained_model_name_or_path": "E:\\dev\\models\\dreambooth\\x\\working",
        "pretrained_vae_name_or_path": "",
        "prior_loss_scale": False,
        "prior_loss_target": 100,
        "prior_loss_weight": 0.75,
        "prior_loss_weight_min": 0.1,
        "resolution": 512,
        "revision": 1450,
        "sample_batch_size": 1,
        "sanity_prompt": "",
        "sanity_seed": 420420,
        "save_ckpt_after": True,
        "save_ckpt_cancel": False,
        "save_ckpt_during": True,
        "save_ema": True,
        "save_embedding_every": 25,
        "save_lora_after": True,
        "save_lora_cancel": False,
        "save_lora_during": True,
        "save_lora_for_extra_net": True,
        "save_preview_every": 5,
        "save_safetensors": True,
        "save_state_after": False,
        "save_state_cancel": False,
        "save_state_during": False,
        "scheduler": "DEISMultistep",
        "shared_diffusers_path": "",
        "shuffle_tags": True,
        "snapshot": "",
        "split_loss": True,
        "src": "",
        "stop_text_encoder": 0.5,
        "strict_tokens": False,
        "dynamic_img_norm": False,
        "tenc_weight_decay": 0.01,
        "tenc_grad_clip_norm": 0.0,
        "tomesd": 0,
        "train_batch_size": 1,
        "train_imagic": False,
        "train_unet": True,
        "train_unfrozen": True,
        "txt_learning_rate": 1e-06,
        "use_concepts": False,
        "use_ema": True,
        "use_lora": False,
        "use_lora_extended": False,
        "use_shared_src": [False],  # its class declares `use_shared_src: bool = False,`
        "use_subdir": False,
        "v2": False,
    }


@pytest.fixture
def later_file(tmp_path, instance_dir) -> Path:
    folder = tmp_path / "models" / "dreambooth" / "x"
    folder.mkdir(parents=True)
    return write_json(folder / "db_config.json", later_db_config(instance_dir))


def test_later_extension_file_loads(later_file, instance_dir):
    assert len(json.loads(later_file.read_text())) == 106  # all of its 2025 config's keys
    loaded = read_params(later_file)
    config = loaded.config
    # renamed and converted keys
    assert config.text_encoder_learning_rate == 1e-6
    assert config.train_text_encoder is True and config.stop_text_encoder == 0.5
    assert config.use_8bit_adam is True and config.optimizer == "AdamW"
    assert config.weight_decay == 0.01
    assert config.save_every_epochs == 25 and config.save_preview_every == 5
    assert config.attention == "xformers"
    # its values are kept where its defaults differ from ours
    assert config.lr_warmup_steps == 500
    assert config.prior_loss_weight == 0.75
    assert config.use_ema is True
    assert config.hflip is False
    assert config.gradient_checkpointing is True
    assert config.model_name == "x"
    assert config.pretrained_model_name_or_path == "E:\\dev\\models\\dreambooth\\x\\working"
    # only missing keys take ours
    assert config.max_train_steps is None and config.num_train_epochs == 100
    assert config.seed is None and config.center_crop is False and config.scale_lr is False
    assert config.adam_beta1 == 0.9 and config.mixed_precision == "fp16"
    # concepts: num_class_images_per 2 x 3 instance images
    first, second = config.concepts_list
    assert first == Concept(
        instance_prompt="a photo of sks dog", class_prompt="a photo of a dog",
        instance_data_dir=str(instance_dir), instance_token="sks", class_token="dog",
        num_class_images=6, class_infer_steps=40,
        save_sample_prompt="a photo of sks dog on the beach")
    assert second.num_class_images == 0 and second.sample_seed == 420
    assert second.class_infer_steps == 60 and second.class_negative_prompt == "blurry"
    assert second.instance_data_dir == "E:\\dev\\sd_db\\clothes_samples\\bossdyn"
    assert any("num_class_images 6" in note for note in loaded.notes)
    assert any("is_valid" in note for note in loaded.notes)


def test_later_extension_file_reports_its_ignored_keys(later_file):
    loaded = read_params(later_file)
    for key in ("model_dir", "revision", "epoch", "lifetime_revision", "initial_revision",
                "graph_smoothing", "sanity_prompt", "sanity_seed", "snapshot", "tomesd",
                "use_dream", "model_type", "full_mixed_precision", "half_model",
                "input_pertubation", "use_shared_src", "lora_weight"):
        assert key in loaded.ignored_keys, key
    assert loaded.ignored_keys == sorted(loaded.ignored_keys)
    # keys that were used are not reported as ignored
    for key in ("txt_learning_rate", "stop_text_encoder", "optimizer", "save_embedding_every",
                "learning_rate", "concepts_list", "hflip", "clip_skip", "tenc_weight_decay",
                "max_token_length", "min_snr_gamma", "noise_scheduler", "offset_noise",
                "shuffle_tags", "freeze_clip_normalization", "deterministic"):
        assert key not in loaded.ignored_keys, key
    assert any("ignored" in note and "model_dir" in note for note in loaded.notes)


def test_later_extension_file_validates_with_precise_problems(later_file, instance_dir):
    config = load_params(later_file)
    problems = validate(config, T4)
    assert sorted(wheres(problems)) == ["concept 2 instance_data_dir",
                                        "pretrained_model_name_or_path"]
    missing = only_problem(problems, "concept 2 instance_data_dir")
    assert "E:\\dev\\sd_db\\clothes_samples\\bossdyn" in missing.message
    assert "does not exist" in missing.message


@pytest.mark.parametrize("fraction,trains", [(0.5, True), (1, True), (0, False), (0.0, False)])
def test_stop_text_encoder(tmp_path, fraction, trains):
    path = write_json(tmp_path / "db_config.json", {"stop_text_encoder": fraction})
    config = load_params(path)
    assert config.train_text_encoder is trains
    assert config.stop_text_encoder == fraction and isinstance(config.stop_text_encoder, float)


def test_explicit_train_text_encoder_wins_over_stop_text_encoder(tmp_path):
    path = write_json(tmp_path / "p.json", {"stop_text_encoder": 0.0, "train_text_encoder": True})
    assert load_params(path).train_text_encoder is True


@pytest.mark.parametrize("name,eight_bit", [
    ("8bit AdamW", True), ("8Bit Adam", True), ("Torch AdamW", False), ("AdamW", None)])
def test_extension_optimizer_names(tmp_path, name, eight_bit):
    config = load_params(write_json(tmp_path / "p.json", {"optimizer": name}))
    assert config.optimizer == "AdamW"
    assert config.use_8bit_adam is eight_bit


def test_explicit_use_8bit_adam_wins_over_optimizer_name(tmp_path):
    config = load_params(write_json(tmp_path / "p.json", {"optimizer": "8bit AdamW",
                                                          "use_8bit_adam": False}))
    assert config.use_8bit_adam is False


@pytest.mark.parametrize("name", ["SGD Dadaptation", "CAME", "Paged 8bit AdamW"])
def test_unsupported_extension_optimizer_is_kept_and_validation_lists_choices(
        tmp_path, valid_config, name):
    loaded = load_params(write_json(tmp_path / "p.json", {"optimizer": name}))
    assert loaded.optimizer == name
    config = valid_config.copy(optimizer=name)
    problem = only_problem(validate(config, CPU), "optimizer")
    assert repr(name) in problem.message and "'AdamW'" in problem.message


@pytest.mark.parametrize("not_cache,cache", [(True, False), (False, True)])
def test_not_cache_latents_is_inverted(tmp_path, not_cache, cache):
    config = load_params(write_json(tmp_path / "p.json", {"not_cache_latents": not_cache}))
    assert config.cache_latents is cache


def test_num_class_images_per_multiplies_by_instance_images(tmp_path, instance_dir):
    config = load_params(write_json(tmp_path / "p.json", {"concepts_list": [
        {"instance_data_dir": str(instance_dir), "num_class_images_per": 2,
         "instance_prompt": "sks dog", "class_prompt": "dog"}]}))
    assert config.concepts_list[0].num_class_images == 6


def test_num_class_images_per_alongside_a_zero_total(tmp_path, instance_dir):
    """Early-2023 concept dicts hold both keys, the total zeroed once turned into per-image."""
    config = load_params(write_json(tmp_path / "p.json", {"concepts_list": [
        {"instance_data_dir": str(instance_dir), "num_class_images": 0,
         "num_class_images_per": 5}]}))
    assert config.concepts_list[0].num_class_images == 15


def test_num_class_images_total_wins_when_set(tmp_path, instance_dir):
    config = load_params(write_json(tmp_path / "p.json", {"concepts_list": [
        {"instance_data_dir": str(instance_dir), "num_class_images": 40,
         "num_class_images_per": 5}]}))
    assert config.concepts_list[0].num_class_images == 40


def test_num_class_images_per_with_a_missing_or_blank_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(make_images(tmp_path / "cwd", 4))  # a blank folder must not count these
    loaded = read_params(write_json(tmp_path / "p.json", {"concepts_list": [
        {"instance_data_dir": "E:\\dev\\x", "num_class_images_per": 3},
        {"instance_data_dir": "", "num_class_images_per": 3}]}))
    assert [c.num_class_images for c in loaded.config.concepts_list] == [3, 3]
    assert any("concept 1" in note and "missing" in note for note in loaded.notes)


def late_2022_db_config(instance_dir: Path) -> dict:
    """A db_config.json of the extension's December 2022 versions."""
    return {
        "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-08,
        "adam_weight_decay": 0.01, "attention": "default", "center_crop": True,
        "concepts_path": "", "custom_model_name": "", "epoch_pause_frequency": 0,
        "epoch_pause_time": 0, "gradient_accumulation_steps": 1, "gradient_checkpointing": True,
        "half_model": False, "hflip": False, "learning_rate": 1.72e-06,
        "lora_learning_rate": 0.0001, "lora_txt_learning_rate": 5e-05,
        "lr_scheduler": "constant", "lr_warmup_steps": 0, "max_token_length": 75,
        "max_train_steps": 1000, "mixed_precision": "fp16",
        "model_dir": "/content/models/dreambooth/old", "model_name": "old",
        "not_cache_latents": True, "num_train_epochs": 1, "pad_tokens": True,
        "pretrained_model_name_or_path": "/content/models/dreambooth/old/working",
        "pretrained_vae_name_or_path": "", "prior_loss_weight": 1.0, "resolution": 512,
        "revision": 0, "sample_batch_size": 1, "save_class_txt": False,
        "save_embedding_every": 500, "save_preview_every": 500,
        "save_use_global_counts": False, "save_use_epochs": False, "scale_lr": True,
        "src": "", "shuffle_tags": False, "train_batch_size": 1,
        "train_text_encoder": False, "use_8bit_adam": True, "use_concepts": False,
        "use_cpu": False, "use_ema": False, "use_lora": False, "scheduler": "ddim", "v2": False,
        "has_ema": False, "lifetime_revision": 0, "initial_revision": 0, "epoch": 0,
        "concepts_list": [{
            "max_steps": -1, "instance_data_dir": str(instance_dir), "class_data_dir": "",
            "file_prompt_contents": "Instance Token + Description",
            "instance_prompt": "[filewords]", "class_prompt": "[filewords]",
            "save_sample_prompt": "", "save_sample_template": "", "instance_token": "shs",
            "class_token": "woman", "num_class_images": 100, "class_negative_prompt": "",
            "class_guidance_scale": 7.5, "class_infer_steps": 60,
            "save_sample_negative_prompt": "", "n_save_sample": 1, "sample_seed": -1,
            "save_guidance_scale": 7.5, "save_infer_steps": 60}],
    }


def test_late_2022_extension_file_loads(tmp_path, instance_dir):
    loaded = read_params(write_json(tmp_path / "db_config.json",
                                    late_2022_db_config(instance_dir)))
    config = loaded.config
    assert config.max_train_steps == 1000 and config.num_train_epochs == 1
    assert config.scale_lr is True and config.center_crop is True
    assert config.use_cpu is False and config.use_8bit_adam is True
    assert config.train_text_encoder is False
    assert config.cache_latents is False
    assert config.weight_decay == 0.01
    assert config.learning_rate == 1.72e-6 and config.lr_scheduler == "constant"
    (concept,) = config.concepts_list
    assert concept.num_class_images == 100
    assert concept.file_prompt_contents == "Instance Token + Description"
    assert concept.instance_token == "shs" and concept.class_token == "woman"
    assert "model_dir" in loaded.ignored_keys and "save_use_epochs" in loaded.ignored_keys
    assert "not_cache_latents" not in loaded.ignored_keys
    assert any("max_steps" in note for note in loaded.notes)


@pytest.mark.parametrize("steps", [0, -1])
def test_late_2022_zero_steps_means_use_the_epochs(tmp_path, steps, valid_config):
    config = load_params(write_json(tmp_path / "p.json", {"max_train_steps": steps,
                                                          "num_train_epochs": 3}))
    assert config.max_train_steps is None and config.num_train_epochs == 3
    assert validate(valid_config.copy(max_train_steps=None, num_train_epochs=3), CPU) == []


def test_earliest_extension_file_with_a_flat_concept_loads(tmp_path, instance_dir):
    """November 2022 files held one concept's keys at the top level."""
    data = {
        "pretrained_model_name_or_path": "tiny", "instance_data_dir": str(instance_dir),
        "class_data_dir": "", "instance_prompt": "photo of sks dog",
        "class_prompt": "photo of a dog", "save_sample_prompt": "", "n_save_sample": 1,
        "save_sample_negative_prompt": "", "save_guidance_scale": 7.5, "save_infer_steps": 50,
        "with_prior_preservation": True, "num_class_images": 20, "output_dir": "/x",
        "working_dir": "/x/working", "resolution": 512, "center_crop": False,
        "train_text_encoder": True, "train_batch_size": 1, "sample_batch_size": 1,
        "num_train_epochs": 1, "max_train_steps": 600, "learning_rate": 5e-6,
        "not_cache_latents": False, "concepts_list": None, "use_cpu": False,
        "pad_tokens": True, "hflip": True, "prior_loss_weight": 1, "seed": None,
        "total_steps": 0,
    }
    loaded = read_params(write_json(tmp_path / "db_config.json", data))
    assert loaded.config.concepts_list == [Concept(
        instance_prompt="photo of sks dog", class_prompt="photo of a dog",
        instance_data_dir=str(instance_dir), num_class_images=20, save_infer_steps=50)]
    assert {"with_prior_preservation", "output_dir", "working_dir",
            "total_steps"} <= set(loaded.ignored_keys)


def test_flat_concept_keys_are_ignored_when_concepts_list_is_set(tmp_path):
    loaded = read_params(write_json(tmp_path / "p.json", {
        "instance_prompt": "old", "concepts_list": [{"instance_prompt": "new"}]}))
    assert [c.instance_prompt for c in loaded.config.concepts_list] == ["new"]
    assert "instance_prompt" in loaded.ignored_keys


def test_db_prefixed_keys_load(tmp_path):
    config = load_params(write_json(tmp_path / "p.json", {
        "db_learning_rate": 3e-6, "db_hflip": False, "db_txt_learning_rate": 4e-7,
        "db_optimizer": "8bit AdamW", "db_model_dir": "E:\\x",
        "db_concepts_list": [{"db_instance_prompt": "sks dog", "db_num_class_images": 5}]}))
    assert config.learning_rate == 3e-6 and config.hflip is False
    assert config.text_encoder_learning_rate == 4e-7 and config.use_8bit_adam is True
    assert config.concepts_list == [Concept(instance_prompt="sks dog", num_class_images=5)]


def test_a_key_neither_ours_nor_the_extensions_is_an_error(later_file, instance_dir):
    data = later_db_config(instance_dir)
    data["lerning_rate"] = 1e-6
    data["concepts_list"][0]["class_promt"] = "dog"
    write_json(later_file, data)
    with pytest.raises(ConfigError) as info:
        read_params(later_file)
    assert sorted(wheres(info.value.problems)) == ["concept 1 class_promt", "lerning_rate"]
    assert "'learning_rate'" in only_problem(info.value.problems, "lerning_rate").message
    assert "'class_prompt'" in only_problem(info.value.problems,
                                            "concept 1 class_promt").message


def test_our_key_wins_over_the_extensions_renamed_key(tmp_path):
    loaded = read_params(write_json(tmp_path / "p.json", {
        "txt_learning_rate": 9e-6, "text_encoder_learning_rate": 3e-6}))
    assert loaded.config.text_encoder_learning_rate == 3e-6
    assert "txt_learning_rate" in loaded.ignored_keys


def test_use_concepts_off_clears_concepts_path(tmp_path):
    loaded = read_params(write_json(tmp_path / "p.json", {
        "use_concepts": False, "concepts_path": "E:\\dev\\concepts.json"}))
    assert loaded.config.concepts_path == ""
    loaded = read_params(write_json(tmp_path / "p.json", {
        "use_concepts": True, "concepts_path": "E:\\dev\\concepts.json"}))
    assert loaded.config.concepts_path == "E:\\dev\\concepts.json"


@pytest.mark.parametrize("name, ours", [("linear_with_warmup", "linear"),
                                        ("cosine_annealing", "cosine"),
                                        ("cosine_annealing_with_restarts", "cosine_with_restarts"),
                                        ("polynomial", "polynomial")])
def test_extension_scheduler_names_map_to_ours(name, ours):
    loaded = params_from_dict({"lr_scheduler": name})
    assert loaded.config.lr_scheduler == ours


@pytest.mark.parametrize("use_epochs, field", [(False, "save_every_steps"),
                                               (True, "save_every_epochs"),
                                               (None, "save_every_epochs")])
def test_save_embedding_every_counts_steps_or_epochs(use_epochs, field):
    data = {"save_embedding_every": 500}
    if use_epochs is not None:
        data["save_use_epochs"] = use_epochs
    config = params_from_dict(data).config
    assert getattr(config, field) == 500
    other = {"save_every_steps": "save_every_epochs",
             "save_every_epochs": "save_every_steps"}[field]
    assert getattr(config, other) == 0
