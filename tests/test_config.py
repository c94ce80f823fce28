"""Tests for the configuration model, the parameters JSON (ours and the A1111 extension's files)
and validation: colab_dreambooth.config.fields, .config, .params and .validation.

Everything runs on real files in ``tmp_path``; nothing is mocked.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from colab_dreambooth.config import fields
from colab_dreambooth.config.fields import GROUPS, coerce, field_specs
from colab_dreambooth.config.params import (
    LoadedParams,
    load_concepts,
    load_params,
    params_from_dict,
    read_params,
    resolve_concepts,
    save_params,
)
from colab_dreambooth.config.prompts import EXISTING_PROMPT_CONTENTS
from colab_dreambooth.config.settings import (
    ATTENTION,
    LR_SCHEDULERS,
    MIXED_PRECISION,
    Concept,
    DreamBoothConfig,
)
from colab_dreambooth.config.validation import validate
from colab_dreambooth.errors import ConfigError, Problem
from colab_dreambooth.runtime.environment import DeviceInfo

REPO_ROOT = Path(__file__).resolve().parents[1]
FIELDS_MD = REPO_ROOT.parent / "shared" / "reference" / "fields.md"

RUN_SPECS = field_specs(DreamBoothConfig)
CONCEPT_SPECS = field_specs(Concept)

T4 = DeviceInfo("cuda", "Tesla T4", 15, False, 1)
A100 = DeviceInfo("cuda", "NVIDIA A100-SXM4-40GB", 40, True, 1)
CPU = DeviceInfo.cpu()


# ----------------------------------------------------------------------------- helpers
def make_images(folder: Path, count: int, size: int = 16) -> Path:
    """``count`` small real PNGs (plus a caption and a non-image that must not count)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (size, size), (40 * i % 256, 90, 200)).save(folder / f"img_{i}.png")
    (folder / "img_0.txt").write_text("a photo of sks dog", encoding="utf-8")
    (folder / "notes.md").write_text("not an image", encoding="utf-8")
    return folder


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=4), encoding="utf-8")
    return path


def wheres(problems) -> list[str]:
    return [p.where for p in problems]


def only_problem(problems, where: str) -> Problem:
    """The one problem at ``where`` (and assert there is exactly one there)."""
    found = [p for p in problems if p.where == where]
    assert len(found) == 1, f"expected one problem at {where!r}, got {problems}"
    return found[0]


def load_error(tmp_path: Path, data, name: str = "params.json") -> ConfigError:
    path = write_json(tmp_path / name, data)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    return info.value


@pytest.fixture
def instance_dir(tmp_path) -> Path:
    return make_images(tmp_path / "instance", 3)


@pytest.fixture
def valid_config(instance_dir, tmp_path) -> DreamBoothConfig:
    """A config that passes validation: the tiny model and an existing instance folder."""
    return DreamBoothConfig(
        model_name="valid",
        pretrained_model_name_or_path="tiny",
        models_root=str(tmp_path / "models"),
        max_train_steps=10,
        concepts_list=[Concept(instance_prompt="photo of sks dog", class_prompt="photo of a dog",
                               instance_token="sks", class_token="dog",
                               instance_data_dir=str(instance_dir), num_class_images=10)],
    )


# ============================================================================= field metadata
@pytest.mark.parametrize("cls", [DreamBoothConfig, Concept])
def test_every_field_has_label_help_group_and_a_valid_default(cls):
    specs = field_specs(cls)
    assert [f.name for f in dataclasses.fields(cls)] == list(specs), "a field lacks setting()"
    for name, spec in specs.items():
        s = spec.setting
        assert s.label.strip(), name
        assert len(s.help.strip()) >= 30, f"{name}: help text too short: {s.help!r}"
        assert s.help.strip().rstrip(".").lower() != s.label.lower(), name
        assert s.group in GROUPS, name
        default = spec.default
        if default is None:
            assert spec.optional, f"{name}: default None but not Optional"
            continue
        assert coerce(spec, default) == default, name
        if s.choices is not None:
            assert default in s.choices, f"{name}: default {default!r} not in its choices"
        if s.minimum is not None:
            assert default >= s.minimum, f"{name}: default {default} below its minimum"
        if s.maximum is not None:
            assert default <= s.maximum, f"{name}: default {default} above its maximum"
        if s.minimum is not None and s.maximum is not None:
            assert s.minimum < s.maximum, name


def test_labels_are_unique_within_each_class():
    for specs in (RUN_SPECS, CONCEPT_SPECS):
        labels = [s.setting.label for s in specs.values()]
        assert len(labels) == len(set(labels)), labels


def test_choice_fields_use_the_documented_lists():
    assert RUN_SPECS["lr_scheduler"].setting.choices == LR_SCHEDULERS == (
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
        "polynomial")
    assert RUN_SPECS["mixed_precision"].setting.choices == MIXED_PRECISION == ("no", "fp16",
                                                                               "bf16")
    assert RUN_SPECS["attention"].setting.choices == ATTENTION
    assert {"default", "xformers", "flash_attention"} <= set(ATTENTION)
    assert CONCEPT_SPECS["file_prompt_contents"].setting.choices == EXISTING_PROMPT_CONTENTS


def test_path_fields_are_marked_as_paths():
    for name in ("pretrained_model_name_or_path", "src", "models_root", "concepts_path"):
        assert RUN_SPECS[name].setting.path, name
    for name in ("instance_data_dir", "class_data_dir", "save_sample_template"):
        assert CONCEPT_SPECS[name].setting.path, name
    assert not RUN_SPECS["learning_rate"].setting.path


def test_field_spec_types_and_optionality():
    assert RUN_SPECS["max_train_steps"].type is int and RUN_SPECS["max_train_steps"].optional
    assert RUN_SPECS["learning_rate"].type is float and not RUN_SPECS["learning_rate"].optional
    assert RUN_SPECS["use_8bit_adam"].type is bool and RUN_SPECS["use_8bit_adam"].optional
    assert RUN_SPECS["concepts_list"].type is list
    assert CONCEPT_SPECS["num_class_images"].type is int


def test_list_defaults_are_not_shared_between_instances():
    a, b = DreamBoothConfig(), DreamBoothConfig()
    a.concepts_list.append(Concept(instance_prompt="x"))
    assert b.concepts_list == []


# Defaults stated in fields.md's tables (single-field rows with a plain default).
DOCUMENTED_DEFAULTS = {
    "max_train_steps": None, "num_train_epochs": 100, "learning_rate": 2e-6,
    "text_encoder_learning_rate": 1e-6, "scale_lr": False,
    "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 0, "resolution": 512,
    "center_crop": False, "hflip": True, "concepts_path": "", "concepts_list": [],
    "sample_batch_size": 1, "gradient_accumulation_steps": 1,
    "use_cpu": False, "use_ema": False, "prior_loss_weight": 1.0, "pad_tokens": True,
    # None = auto: the GPU preset chooses (on a T4 it gives the documented defaults: batch 1,
    # fp16, default attention, latents cached, text encoder trained; see test_presets.py).
    "train_batch_size": None, "use_8bit_adam": None, "mixed_precision": None,
    "attention": None, "cache_latents": None, "train_text_encoder": None,
    "gradient_checkpointing": None,
}
DOCUMENTED_CONCEPT_DEFAULTS = {
    "class_guidance_scale": 7.5, "class_infer_steps": 40, "num_class_images": 0,
    "file_prompt_contents": "Description", "sample_seed": -1,
}


def test_defaults_match_fields_md():
    config, concept = DreamBoothConfig(), Concept()
    for name, expected in DOCUMENTED_DEFAULTS.items():
        assert getattr(config, name) == expected, name
        assert type(getattr(config, name)) is type(expected), name
    for name, expected in DOCUMENTED_CONCEPT_DEFAULTS.items():
        assert getattr(concept, name) == expected, name


def _fields_md_sections() -> dict[str, list[str]]:
    """Table rows (first cell) of the Model, Parameters, Advanced and Concepts sections."""
    text = FIELDS_MD.read_text(encoding="utf-8")
    sections: dict[str, list[str]] = {}
    for chunk in re.split(r"^## ", text, flags=re.M)[1:]:
        title = chunk.split("\n", 1)[0].strip()
        key = next((k for k in ("Model", "Parameters", "Advanced", "Concepts")
                    if title.startswith(k)), None)
        if key is None:
            continue
        rows = [line for line in chunk.splitlines() if line.startswith("|")]
        first_cells = [row.split("|")[1] for row in rows[2:]]  # skip header and separator
        sections[key] = first_cells
    return sections


def _names_in(cell: str) -> list[str]:
    # `tiny` in "(the name `tiny` selects ...)" is a value, not a field.
    return re.findall(r"(?<!the name )`([a-z][a-z0-9_]*)`", cell)


@pytest.mark.skipif(not FIELDS_MD.is_file(), reason="fields.md reference not present")
def test_every_field_in_fields_md_exists():
    sections = _fields_md_sections()
    assert set(sections) == {"Model", "Parameters", "Advanced", "Concepts"}
    found = []
    for section, cells in sections.items():
        specs = CONCEPT_SPECS if section == "Concepts" else RUN_SPECS
        for cell in cells:
            for name in _names_in(cell):
                found.append(name)
                assert name in specs, f"{section}: `{name}` from fields.md is not a field"
    # the parse itself worked: the tables name this many fields
    assert len(found) >= 50, found
    for name in ("src", "model_name", "pretrained_model_name_or_path", "max_train_steps",
                 "concepts_path", "concepts_list", "cache_latents", "seed", "save_every_steps",
                 "save_preview_every", "class_seed", "save_sample_template", "instance_token"):
        assert name in found, name
    assert "tiny" not in found


@pytest.mark.skipif(not FIELDS_MD.is_file(), reason="fields.md reference not present")
def test_form_labels_are_the_extensions_labels():
    """Rows that are just "Label `field`" keep the extension's label as our form label."""
    checked = 0
    for section, cells in _fields_md_sections().items():
        specs = CONCEPT_SPECS if section == "Concepts" else RUN_SPECS
        for cell in cells:
            m = re.fullmatch(r"\s*([^`]+?)\s*`([a-z0-9_]+)`\s*", cell)
            if m:
                assert specs[m.group(2)].setting.label == m.group(1), m.group(2)
                checked += 1
    assert checked >= 25


# ============================================================================= coerce
def test_coerce_types():
    lr, steps, flip = RUN_SPECS["learning_rate"], RUN_SPECS["max_train_steps"], RUN_SPECS["hflip"]
    assert coerce(lr, 1) == 1.0 and isinstance(coerce(lr, 1), float)
    assert coerce(steps, 3.0) == 3 and isinstance(coerce(steps, 3.0), int)
    assert coerce(steps, None) is None
    with pytest.raises(TypeError, match="whole number"):
        coerce(steps, 1.5)
    with pytest.raises(TypeError, match="true or false"):
        coerce(flip, 1)
    with pytest.raises(TypeError, match="a number"):
        coerce(lr, True)
    with pytest.raises(TypeError, match="blank"):
        coerce(lr, None)
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(TypeError, match="finite"):
            coerce(lr, bad)


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


# ============================================================================= config helpers
def test_config_copy_is_deep_for_concepts(valid_config):
    copy = valid_config.copy(learning_rate=1e-5)
    copy.concepts_list[0].instance_prompt = "changed"
    assert valid_config.concepts_list[0].instance_prompt == "photo of sks dog"
    assert copy.learning_rate == 1e-5 and valid_config.learning_rate == 2e-6


def test_derived_paths(tmp_path):
    config = DreamBoothConfig(model_name="my/../model:1", models_root=str(tmp_path),
                              concepts_list=[Concept(), Concept(class_data_dir="/data/cls")])
    assert config.model_dir == tmp_path / "dreambooth" / "my..model1"
    assert config.class_dir(0) == config.model_dir / "classifiers" / "concept_1"
    assert config.class_dir(1) == Path("/data/cls")
    assert DreamBoothConfig(model_name="  ").model_dir == Path("models/dreambooth/dreambooth-model")
    assert DreamBoothConfig(src=" a.ckpt ", pretrained_model_name_or_path="tiny").base_model == \
        "a.ckpt"
    assert DreamBoothConfig(pretrained_model_name_or_path="tiny").base_model == "tiny"


def test_concept_wants_prior_preservation():
    assert not Concept(class_prompt="dog").wants_prior_preservation
    assert Concept(class_prompt="dog", num_class_images=5).wants_prior_preservation
    assert Concept(class_prompt="dog", class_data_dir="/x").wants_prior_preservation
    assert not Concept(class_prompt="", num_class_images=5).wants_prior_preservation


def test_setting_rejects_an_unknown_group():
    with pytest.raises(AssertionError):
        fields.setting(1, "x", "help", "Nope")


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
