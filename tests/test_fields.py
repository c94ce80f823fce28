"""Tests for the settings' declarations (colab_dreambooth.config.fields, .settings, .concept):
labels, help, groups, limits, choices, what derives from them, and coerce.

Nothing is mocked.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from colab_dreambooth.config import fields
from colab_dreambooth.config.concept import Concept
from colab_dreambooth.config.fields import GROUPS, coerce, field_specs
from colab_dreambooth.config.prompts import EXISTING_PROMPT_CONTENTS
from colab_dreambooth.config.settings import (
    ATTENTION,
    LR_SCHEDULERS,
    MIXED_PRECISION,
    DreamBoothConfig,
)
from colab_dreambooth.runtime.device import DeviceInfo

REPO_ROOT = Path(__file__).resolve().parents[1]
FIELDS_MD = REPO_ROOT.parent / "shared" / "reference" / "fields.md"

RUN_SPECS = field_specs(DreamBoothConfig)
CONCEPT_SPECS = field_specs(Concept)

T4 = DeviceInfo("cuda", "Tesla T4", 15, False, 1)
A100 = DeviceInfo("cuda", "NVIDIA A100-SXM4-40GB", 40, True, 1)


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


# ============================================================================= derived from the declarations
def test_must_match_is_what_a_checkpoint_depends_on():
    from colab_dreambooth.training.checkpoints import MUST_MATCH

    assert MUST_MATCH == fields.must_match_fields(DreamBoothConfig)
    # What the fields said before they declared it themselves.
    assert {"pretrained_model_name_or_path", "src", "use_lora", "lora_unet_rank",
            "lora_txt_rank", "train_text_encoder", "use_ema", "train_batch_size",
            "gradient_accumulation_steps", "resolution", "center_crop", "hflip",
            "cache_latents", "optimizer", "use_8bit_adam", "full_fp16",
            "freeze_clip_normalization", "enable_bucket", "min_bucket_reso",
            "max_bucket_reso"} <= set(MUST_MATCH)


@pytest.mark.parametrize("name", ["lora_alpha", "clip_skip", "max_token_length"])
def test_what_changes_the_trained_function_or_its_conditioning_must_match(name):
    """lora_alpha scales the adapters' output; clip_skip and max_token_length change the
    conditioning the UNet learnt to read: resuming with another value is refused."""
    assert name in fields.must_match_fields(DreamBoothConfig)


def test_mixed_precision_may_change_on_resume():
    """The trained weights and optimizer states are fp32: a run from an A100 (bf16) goes on
    on a T4 (fp16), whose preset fills the blank mixed precision."""
    assert "mixed_precision" not in fields.must_match_fields(DreamBoothConfig)


def test_preset_fields_keep_the_preset_tables_column_order():
    from colab_dreambooth.config.presets import PRESET_FIELDS

    assert PRESET_FIELDS == fields.preset_fields(DreamBoothConfig) == (
        "mixed_precision", "use_8bit_adam", "gradient_checkpointing", "attention",
        "cache_latents", "train_batch_size", "train_text_encoder")
    for name in PRESET_FIELDS:  # blank is what lets the preset decide
        assert RUN_SPECS[name].optional and RUN_SPECS[name].default is None, name


def test_a_preset_field_must_default_to_blank():
    with pytest.raises(AssertionError):
        fields.setting(1, "x", "help", "Advanced", preset_column=1)


def test_every_group_has_a_form_tab():
    assert fields.TABS == ("Model", "Parameters", "Advanced", "Concepts", "Saving", "Sampling")
    assert set(fields.GROUP_TABS) == set(GROUPS)
    assert CONCEPT_SPECS["class_seed"].setting.tab == "Concepts"  # per concept, as the extension
    assert RUN_SPECS["learning_rate"].setting.tab == "Parameters"


def test_same_setting_repeats_a_declaration():
    from colab_dreambooth.config.commands import DehydrateSettings, ExportSettings
    from colab_dreambooth.publish.release import ReleaseSettings

    release = field_specs(ReleaseSettings)
    export = field_specs(ExportSettings)
    assert release["fp16"].setting == export["fp16"].setting
    assert release["fp16"].default == export["fp16"].default is True
    assert release["ema"].default == export["ema"].default is False
    assert release["dehydrate_rank"].setting == field_specs(DehydrateSettings)["rank"].setting


def test_previews_start_from_the_sample_commands_defaults():
    from colab_dreambooth.config.commands import SampleSettings

    sample, concept = SampleSettings(), Concept()
    assert (concept.n_save_sample, concept.sample_seed, concept.save_guidance_scale,
            concept.save_infer_steps) == (sample.n, sample.seed, sample.guidance_scale,
                                          sample.steps)
