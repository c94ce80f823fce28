"""Tests for the parameters JSON (colab_dreambooth.config.params): save and load, bad keys and
types, concepts files.

Everything runs on real files in ``tmp_path``; nothing is mocked.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from config_helpers import load_error, make_images, only_problem, wheres, write_json

from colab_dreambooth.config.concept import Concept
from colab_dreambooth.config.fields import field_specs
from colab_dreambooth.config.params import (
    LoadedParams,
    load_concepts,
    load_params,
    params_from_dict,
    resolve_concepts,
    save_params,
)
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.errors import ConfigError
from colab_dreambooth.runtime.device import DeviceInfo

RUN_SPECS = field_specs(DreamBoothConfig)
CONCEPT_SPECS = field_specs(Concept)

T4 = DeviceInfo("cuda", "Tesla T4", 15, False, 1)
A100 = DeviceInfo("cuda", "NVIDIA A100-SXM4-40GB", 40, True, 1)


# ============================================================================= save / load
def beside(config: DreamBoothConfig, folder: Path) -> DreamBoothConfig:
    """``config`` as loaded from a file in ``folder``: relative instance/class folders are
    taken relative to the file's folder."""
    concepts = []
    for concept in config.concepts_list:
        changes = {key: str(folder / value) for key in ("instance_data_dir", "class_data_dir")
                   if (value := getattr(concept, key)) and not Path(value).is_absolute()}
        concepts.append(dataclasses.replace(concept, **changes))
    return config.copy(concepts_list=concepts)


def rich_config(tmp_path: Path) -> DreamBoothConfig:
    """Two concepts and many non-default values, with unicode everywhere prompts go."""
    return DreamBoothConfig(
        model_name="Zoë's 犬 model",
        pretrained_model_name_or_path="tiny",
        src="",
        models_root=str(tmp_path / "models"),
        max_train_steps=1200,
        num_train_epochs=None,
        learning_rate=5e-6,
        text_encoder_learning_rate=2.5e-6,
        scale_lr=True,
        lr_scheduler="cosine_with_restarts",
        lr_warmup_steps=50,
        lr_cycles=3,
        lr_power=2.0,
        resolution=640,
        center_crop=True,
        hflip=False,
        seed=1234,
        concepts_path="",
        train_batch_size=2,
        sample_batch_size=4,
        gradient_accumulation_steps=3,
        use_cpu=False,
        use_8bit_adam=False,
        weight_decay=0.0,
        adam_beta1=0.85,
        adam_beta2=0.99,
        adam_epsilon=1e-7,
        max_grad_norm=0.5,
        mixed_precision="bf16",
        attention="xformers",
        cache_latents=False,
        train_text_encoder=False,
        stop_text_encoder=0.25,
        use_ema=True,
        ema_on_cpu=True,
        ema_decay=0.995,
        prior_loss_weight=0.5,
        pad_tokens=False,
        gradient_checkpointing=True,
        save_every_steps=200,
        save_every_epochs=3,
        save_preview_every=7,
        concepts_list=[
            Concept(instance_prompt="photo of shs girl, café au lait, 東京 «quoted» \"x\"",
                    class_prompt="photo of a girl 👩", instance_data_dir=str(tmp_path / "inst"),
                    class_data_dir=str(tmp_path / "class"),
                    file_prompt_contents="Instance Token + Description", instance_token="shs",
                    class_token="a woman, woman", num_class_images=150,
                    class_negative_prompt="blurry, naïve", class_guidance_scale=6.0,
                    class_infer_steps=30, class_seed=7, save_sample_prompt="[filewords]",
                    save_sample_negative_prompt="lowres", save_sample_template="",
                    n_save_sample=2, sample_seed=99, save_guidance_scale=9.5,
                    save_infer_steps=25),
            Concept(instance_prompt="[filewords]", class_prompt="",
                    instance_data_dir="relative/dir", instance_token="ohwx",
                    file_prompt_contents="Class Token + Description", num_class_images=0),
        ],
    )


def test_save_then_load_is_identical(tmp_path):
    config = rich_config(tmp_path)
    changed = [n for n, s in RUN_SPECS.items() if getattr(config, n) != s.default]
    assert len(changed) >= 35  # the round trip is exercised on non-default values
    path = save_params(config, tmp_path / "out" / "params.json")  # parent is created
    assert path == tmp_path / "out" / "params.json"
    loaded = load_params(path)
    assert loaded == beside(config, path.parent)
    assert all(isinstance(c, Concept) for c in loaded.concepts_list)
    for name in RUN_SPECS:  # types survive too (2.0 stays a float, 3 an int)
        assert type(getattr(loaded, name)) is type(getattr(config, name)), name
    # saving the loaded config (now with absolute folders) gives the same bytes
    again = save_params(loaded, tmp_path / "out" / "again.json")
    assert save_params(load_params(again), tmp_path / "third.json").read_text(
        encoding="utf-8") == again.read_text(encoding="utf-8")


def test_optional_fields_round_trip_as_none_and_as_values(tmp_path):
    optional = [n for n, s in RUN_SPECS.items() if s.optional]
    assert {"max_train_steps", "num_train_epochs", "seed", "use_8bit_adam",
            "gradient_checkpointing"} <= set(optional)
    blank = DreamBoothConfig(max_train_steps=None, num_train_epochs=None, seed=None,
                             use_8bit_adam=None, gradient_checkpointing=None)
    set_ = DreamBoothConfig(max_train_steps=5, num_train_epochs=2, seed=0, use_8bit_adam=True,
                            gradient_checkpointing=False)
    for config in (blank, set_):
        path = save_params(config, tmp_path / "p.json")
        data = json.loads(path.read_text(encoding="utf-8"))
        for name in optional:
            assert data[name] == getattr(config, name)
        assert load_params(path) == config
    assert json.loads((tmp_path / "p.json").read_text())["seed"] == 0  # 0 is not blank


def test_json_keys_are_exactly_the_field_names(tmp_path):
    path = save_params(rich_config(tmp_path), tmp_path / "params.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert list(data) == list(RUN_SPECS)
    assert len(data["concepts_list"]) == 2
    for concept in data["concepts_list"]:
        assert list(concept) == list(CONCEPT_SPECS)
    assert data["concepts_list"][0]["instance_prompt"].endswith('«quoted» "x"')


def test_partial_json_takes_defaults_for_the_rest(tmp_path):
    path = write_json(tmp_path / "p.json", {
        "learning_rate": 1e-5, "hflip": False,
        "concepts_list": [{"instance_prompt": "sks dog", "num_class_images": 50}]})
    assert load_params(path) == DreamBoothConfig(
        learning_rate=1e-5, hflip=False,
        concepts_list=[Concept(instance_prompt="sks dog", num_class_images=50)])
    (tmp_path / "empty.json").write_text("{}", encoding="utf-8")
    assert load_params(tmp_path / "empty.json") == DreamBoothConfig()


def test_null_for_a_required_field_takes_the_default(tmp_path):
    path = write_json(tmp_path / "p.json", {"learning_rate": None, "concepts_list": None,
                                            "seed": None})
    assert load_params(path) == DreamBoothConfig()


def test_utf8_bom_file_loads(tmp_path):
    path = tmp_path / "bom.json"
    text = json.dumps({"model_name": "Ünïcode", "concepts_list": [
        {"instance_prompt": "photo of shs 犬"}]}, ensure_ascii=False)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    config = load_params(path)
    assert config.model_name == "Ünïcode"
    assert config.concepts_list[0].instance_prompt == "photo of shs 犬"


def test_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "learning_rate": 1e-6,\n  "hflip": tru\n}\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    (problem,) = info.value.problems
    assert problem.where == str(path)
    assert "line 3" in problem.message and "column 12" in problem.message
    assert "line 3" in str(info.value)


def test_missing_file_and_non_utf8_and_non_object(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "nope.json")
    (tmp_path / "latin1.json").write_bytes('{"model_name": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8"):
        load_params(tmp_path / "latin1.json")
    (tmp_path / "number.json").write_text("42", encoding="utf-8")
    with pytest.raises(ConfigError, match="JSON object"):
        load_params(tmp_path / "number.json")


def test_non_finite_numbers_are_rejected(tmp_path):
    path = tmp_path / "nan.json"
    path.write_text('{"learning_rate": NaN, "prior_loss_weight": Infinity}', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert sorted(wheres(info.value.problems)) == ["learning_rate", "prior_loss_weight"]


def test_save_params_leaves_no_temp_files(tmp_path):
    folder = tmp_path / "out"
    save_params(DreamBoothConfig(), folder / "params.json")
    save_params(rich_config(tmp_path), folder / "params.json")  # overwrite in place
    assert [p.name for p in folder.iterdir()] == ["params.json"]
    assert load_params(folder / "params.json") == beside(rich_config(tmp_path), folder)


def test_failed_save_removes_its_temp_file_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "params.json"
    target.mkdir()  # renaming a file over a folder fails
    (target / "keep").write_text("x")
    with pytest.raises(OSError):
        save_params(DreamBoothConfig(), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.json"]
    assert (target / "keep").read_text() == "x"


# ============================================================================= bad keys and types
def test_unknown_key_suggests_the_closest_name(tmp_path):
    error = load_error(tmp_path, {"learning_rat": 1e-6})
    problem = only_problem(error.problems, "learning_rat")
    assert "'learning_rate'" in problem.message


def test_unknown_concept_key_suggests_the_closest_name(tmp_path):
    error = load_error(tmp_path, {"concepts_list": [{"instance_prompt": "a"},
                                                    {"instance_promt": "sks dog"}]})
    problem = only_problem(error.problems, "concept 2 instance_promt")
    assert "did you mean 'instance_prompt'" in problem.message


def test_concept_key_suggestions_are_concept_fields(tmp_path):
    error = load_error(tmp_path, {"concepts_list": [{"txt_learning_rat": 1e-6}]})
    problem = only_problem(error.problems, "concept 1 txt_learning_rat")
    assert "text_encoder_learning_rate" not in problem.message


def test_unknown_key_far_from_everything_says_remove_it(tmp_path):
    error = load_error(tmp_path, {"zzzz_qqqq": 1})
    assert "remove it" in only_problem(error.problems, "zzzz_qqqq").message


def test_renamed_extension_key_misspelt_suggests_our_name(tmp_path):
    error = load_error(tmp_path, {"txt_learning_rat": 1e-6})
    assert "'text_encoder_learning_rate'" in only_problem(error.problems,
                                                          "txt_learning_rat").message


def test_all_problems_are_reported_at_once(tmp_path):
    error = load_error(tmp_path, {
        "learning_rat": 1e-6, "hflp": True, "model_name": "ok",
        "concepts_list": [{"instance_promt": "sks dog"}],
        "train_batch_size": "two"})
    assert sorted(wheres(error.problems)) == sorted(
        ["learning_rat", "hflp", "concept 1 instance_promt", "train_batch_size"])
    assert str(error).startswith("4 problem(s)")


@pytest.mark.parametrize("key,value,expected", [
    ("learning_rate", "fast", "a number"),
    ("train_batch_size", 1.5, "a whole number"),
    ("hflip", "yes", "true or false"),
    ("concepts_list", {}, "list"),
    ("model_name", 5, "text"),
    ("use_8bit_adam", "auto", "true or false"),
])
def test_wrong_types_name_the_field(tmp_path, key, value, expected):
    error = load_error(tmp_path, {key: value})
    problem = only_problem(error.problems, key)
    assert expected in problem.message
    assert len(error.problems) == 1


def test_wrong_type_in_a_concept_names_concept_and_field(tmp_path):
    error = load_error(tmp_path, {"concepts_list": [{"instance_prompt": "x"},
                                                    {"num_class_images": "lots"}, "not a dict"]})
    assert sorted(wheres(error.problems)) == ["concept 2 num_class_images", "concept 3"]


@pytest.mark.parametrize("key,value", [("optimizer", 5), ("stop_text_encoder", "half"),
                                       ("not_cache_latents", "yes"), ("max_train_steps", "x")])
def test_wrong_type_of_an_imported_key_is_reported_once(tmp_path, key, value):
    error = load_error(tmp_path, {key: value})
    assert wheres(error.problems) == [key]


def test_params_from_dict_and_loaded_params():
    loaded = params_from_dict({"learning_rate": 3e-6, "model_dir": "x"}, source="test")
    assert isinstance(loaded, LoadedParams)
    assert loaded.config == DreamBoothConfig(learning_rate=3e-6)
    assert loaded.ignored_keys == ["model_dir"]
    assert any("model_dir" in note and note.startswith("test") for note in loaded.notes)


# ----------------------------------------------------------------------------- concepts files
EXTENSION_CONCEPTS = [  # the extension's own example concepts_list.json, plus a relative one
    {"instance_data_dir": "E:\\dev\\sd_db\\clothes_samples\\bossdyn",
     "class_data_dir": "E:\\dev\\sd_db\\pants", "instance_prompt": "a man wearing bossdyn pants",
     "class_prompt": "a man wearing pants", "save_sample_prompt": "a man wearing bossdyn pants",
     "save_sample_template": "", "instance_token": "", "class_token": "",
     "num_class_images_per": 5, "class_negative_prompt": "", "class_guidance_scale": 7.5,
     "class_infer_steps": 40, "save_sample_negative_prompt": "", "n_save_sample": 1,
     "sample_seed": -1, "save_guidance_scale": 7.5, "save_infer_steps": 40},
    {"instance_data_dir": "images/dog", "class_data_dir": "classes/dog",
     "instance_prompt": "photo of sks dog", "class_prompt": "photo of a dog",
     "num_class_images_per": 2, "is_valid": True},
]


def test_load_concepts_resolves_relative_folders_against_the_file(tmp_path):
    make_images(tmp_path / "set" / "images" / "dog", 3)
    path = write_json(tmp_path / "set" / "concepts_list.json", EXTENSION_CONCEPTS)
    first, second = load_concepts(path)
    assert first.instance_data_dir == "E:\\dev\\sd_db\\clothes_samples\\bossdyn"  # kept as is
    assert first.class_data_dir == "E:\\dev\\sd_db\\pants"
    assert first.num_class_images == 5  # folder missing: per-image count kept, with a note
    assert first.save_infer_steps == 40 and first.class_infer_steps == 40
    assert second.instance_data_dir == str(tmp_path / "set" / "images" / "dog")
    assert second.class_data_dir == str(tmp_path / "set" / "classes" / "dog")
    assert second.num_class_images == 6


def test_load_concepts_accepts_a_params_object_and_reports_bad_keys(tmp_path):
    path = write_json(tmp_path / "c.json", {"concepts_list": [{"instance_prompt": "a"}]})
    assert load_concepts(path) == [Concept(instance_prompt="a")]
    path = write_json(tmp_path / "bad.json", [{"instance_promt": "a"}, 5])
    with pytest.raises(ConfigError) as info:
        load_concepts(path)
    assert sorted(wheres(info.value.problems)) == ["concept 1 instance_promt", "concept 2"]
    write_json(tmp_path / "n.json", 5)
    with pytest.raises(ConfigError, match="list of concept"):
        load_concepts(tmp_path / "n.json")


def test_a_bare_concepts_list_passed_as_params_loads(tmp_path):
    path = write_json(tmp_path / "c.json", [{"instance_prompt": "sks dog"}])
    assert load_params(path).concepts_list == [Concept(instance_prompt="sks dog")]


def test_resolve_concepts_uses_concepts_path(tmp_path):
    make_images(tmp_path / "set" / "images" / "dog", 3)
    path = write_json(tmp_path / "set" / "concepts.json", EXTENSION_CONCEPTS[1:])
    config = DreamBoothConfig(concepts_path=str(path),
                              concepts_list=[Concept(instance_prompt="inline")])
    resolved = resolve_concepts(config)
    assert [c.instance_prompt for c in resolved.concepts_list] == ["photo of sks dog"]
    assert resolved.concepts_list[0].instance_data_dir == str(tmp_path / "set" / "images" / "dog")
    assert resolved.concepts_list[0].num_class_images == 6
    assert [c.instance_prompt for c in config.concepts_list] == ["inline"]  # not changed
    plain = DreamBoothConfig(concepts_list=[Concept(instance_prompt="inline")])
    assert resolve_concepts(plain) is plain


def test_resolve_concepts_with_a_missing_file(tmp_path):
    config = DreamBoothConfig(concepts_path=str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError) as info:
        resolve_concepts(config)
    assert wheres(info.value.problems) == ["concepts_path"]
