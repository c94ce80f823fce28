"""The notebook widgets driven from Python: forms, uploads, data views and the training view."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import ipywidgets  # noqa: F401  (the test extra installs it)
import ipywidgets as w  # noqa: E402
import pytest
from PIL import Image  # noqa: E402

from colab_dreambooth.config.concept import Concept
from colab_dreambooth.config.fields import field_specs  # noqa: E402
from colab_dreambooth.config.params import load_params, save_params  # noqa: E402
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.publish.release import ReleaseSettings  # noqa: E402
from colab_dreambooth.runtime.device import DeviceInfo
from widgets.app import TrainApp
from widgets.class_images import (
    CLASS_IMAGE_FIELDS,  # noqa: E402
    ClassImagesApp,
    count_class_images,
)
from widgets.compat import IPYWIDGETS_MAJOR, help_of, label_of, titles_of  # noqa: E402
from widgets.controls import NumberControl, parse_number  # noqa: E402
from widgets.environment import runtime_banner
from widgets.form import ConfigForm
from widgets.plot import loss_curve, smooth  # noqa: E402
from widgets.prepare import UploadBox, caption_grid, crop_preview, data_report, save_uploads
from widgets.release import ReleaseApp
from widgets.training_view import TrainingView, estimate_total_steps
from widgets.workdir import (
    class_images_config,
    params_file,
    prepare_config,
    release_config,
    training_config,
)

CPU = DeviceInfo.cpu()
RUN_SPECS = field_specs(DreamBoothConfig)
CONCEPT_SPECS = field_specs(Concept)


def form_for(config: DreamBoothConfig | None = None, **kwargs) -> ConfigForm:
    return ConfigForm(config, device=CPU, **kwargs)


def type_into(form: ConfigForm, name: str, value, concept: int | None = None) -> None:
    """Change a widget's value as the user would (observers fire)."""
    fields = form.fields if concept is None else form.concepts[concept].fields
    fields[name].input.value = value


def shown(form: ConfigForm, name: str, concept: int | None = None) -> list[str]:
    fields = form.fields if concept is None else form.concepts[concept].fields
    return fields[name].shown


def without_class_images(config: DreamBoothConfig) -> DreamBoothConfig:
    """The demo concept without prior preservation: fewer latents to cache, the same loop."""
    return config.copy(concepts_list=[dataclasses.replace(
        config.concepts_list[0], class_prompt="", num_class_images=0, class_data_dir="")])


def walk(widget: w.Widget):
    yield widget
    for child in getattr(widget, "children", ()):
        yield from walk(child)


# ----------------------------------------------------------------------------- generation
def test_every_page_has_a_title_and_every_input_its_help(tiny_config, tmp_path):
    """Under ipywidgets 7 (Colab) and 8 alike: read from the state the browser receives."""
    app = TrainApp(tiny_config, params_path=tmp_path / "params.json", device=CPU)
    app.form.add_concept()
    containers = [x for x in walk(app.widget) if isinstance(x, (w.Tab, w.Accordion))]
    assert len(containers) == 2  # the tabs and the concepts
    for container in containers:
        titles = titles_of(container)
        assert len(titles) == len(container.children) and all(titles), titles
    state = app.form.tabs.get_state()
    assert ("titles" if IPYWIDGETS_MAJOR >= 8 else "_titles") in state
    inputs = [x for x in walk(app.widget) if isinstance(x, (w.Text, w.Checkbox, w.Dropdown))
              and x.description]
    assert len(inputs) > 60
    assert all(help_of(x) for x in inputs), [x.description for x in inputs if not help_of(x)]


def test_every_field_has_exactly_one_generated_widget(tiny_config):
    form = form_for(tiny_config)
    assert set(form.fields) == set(RUN_SPECS) - {"concepts_list"}
    assert len(form.concepts) == 1 and set(form.concepts[0].fields) == set(CONCEPT_SPECS)
    inputs = [id(x) for x in walk(form.widget)]
    controls = list(form.fields.values()) + list(form.concepts[0].fields.values())
    for control in controls:
        assert inputs.count(id(control.input)) == 1, control.name
        assert label_of(control.input) == control.spec.setting.label
        assert help_of(control.input) == control.spec.setting.help
    # The widget kind follows the type and metadata alone.
    assert isinstance(form.fields["hflip"].input, w.Checkbox)
    assert isinstance(form.fields["use_8bit_adam"].input, w.Dropdown)
    tristate = form.fields["use_8bit_adam"].input
    assert [label for label, _ in tristate.options] == ["auto", "on", "off"]
    assert tristate.label == "off" and form.fields["use_8bit_adam"].get() is False
    form.fields["use_8bit_adam"].set(None)
    assert tristate.label == "auto" and form.fields["use_8bit_adam"].get() is None
    assert list(form.fields["lr_scheduler"].input.options) == [
        (c, c) for c in RUN_SPECS["lr_scheduler"].setting.choices]
    # A choice the GPU preset may make offers "auto" (blank) first.
    precision = form.fields["mixed_precision"]
    assert [label for label, _ in precision.input.options] == ["auto", "no", "fp16", "bf16"]
    precision.set(None)
    assert precision.input.label == "auto" and precision.get() is None
    precision.set("bf16")
    assert precision.get() == "bf16"
    assert form.fields["train_batch_size"].input.placeholder == "blank or 1 to 256"
    assert isinstance(form.fields["max_train_steps"], NumberControl)
    assert form.fields["resolution"].input.placeholder == "64 to 2048"
    assert form.fields["seed"].input.placeholder.startswith("blank or")
    assert form.fields["models_root"].hint is not None  # a path field
    assert form.concepts[0].fields["instance_data_dir"].hint.value  # the folder exists


def test_tabs_follow_the_extension_and_class_image_fields_sit_with_concepts(tiny_config):
    form = form_for(tiny_config)
    assert [t.split(" \u26a0")[0] for t in titles_of(form.tabs)] == [
        "Model", "Parameters", "Advanced", "Concepts", "Saving", "Sampling"]
    concepts_tab = form.tabs.children[form.tab_names.index("Concepts")]
    inside = {id(x) for x in walk(concepts_tab)}
    assert id(form.concepts[0].fields["class_guidance_scale"].input) in inside
    assert id(form.fields["learning_rate"].input) not in inside
    model_tab = form.tabs.children[form.tab_names.index("Model")]
    assert id(form.fields["model_name"].input) in {id(x) for x in walk(model_tab)}


def test_header_shows_runtime_gpu_and_preset():
    t4 = DeviceInfo("cuda", "Tesla T4", 15.0, False, 1)
    text = runtime_banner(t4)
    assert "Tesla T4" in text and "15.0 GB" in text and "bf16 no" in text
    assert "<b>preset</b>: T4 (NVIDIA T4, 16 GB" in text and "local machine" in text
    assert "CPU" in runtime_banner(CPU) and "preset</b>: CPU" in runtime_banner(CPU)
    assert "my preset" in runtime_banner(t4, "my preset")
    header = ConfigForm(device=t4).header.value
    assert "Tesla T4" in header and "preset</b>: T4" in header


# ----------------------------------------------------------------------------- values
def test_config_follows_the_widgets(tiny_config):
    form = form_for(tiny_config)
    assert form.config == tiny_config
    type_into(form, "learning_rate", "1e-5")
    type_into(form, "max_train_steps", "")
    type_into(form, "use_8bit_adam", True)
    type_into(form, "gradient_checkpointing", "auto")
    type_into(form, "lr_scheduler", "cosine")
    type_into(form, "hflip", False)
    type_into(form, "class_token", "a dog, dog", concept=0)
    type_into(form, "num_class_images", " 7 ", concept=0)
    config = form.config
    assert config.learning_rate == 1e-5 and config.max_train_steps is None
    assert config.use_8bit_adam is True and config.lr_scheduler == "cosine"
    assert config.gradient_checkpointing is None
    assert config.hflip is False
    assert config.concepts_list[0].class_token == "a dog, dog"
    assert config.concepts_list[0].num_class_images == 7
    assert form.config is not form.config  # a fresh object each time
    other = tiny_config.copy(resolution=128, seed=None, gradient_checkpointing=False)
    form.set_config(other)
    assert form.config == other
    assert form.fields["seed"].input.value == ""


@pytest.mark.parametrize("name, text, expected", [
    ("resolution", "512", 512), ("resolution", "512.0", 512), ("learning_rate", "2e-6", 2e-6),
    ("seed", "", None), ("seed", "4294967295", 4294967295), ("learning_rate", " 0.5 ", 0.5),
])
def test_number_boxes_parse(name, text, expected):
    value = parse_number(RUN_SPECS[name], text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("name, text, message", [
    ("resolution", "abc", "'abc' is not a whole number"),
    ("resolution", "512.5", "'512.5' is not a whole number"),
    ("resolution", "", "blank: enter a whole number"),
    ("learning_rate", "2,5", "use a dot"),
    ("learning_rate", "nan", "not a finite number"),
])
def test_number_boxes_reject(name, text, message):
    with pytest.raises(ValueError, match=message):
        parse_number(RUN_SPECS[name], text)


# ----------------------------------------------------------------------------- validation
def test_valid_config_enables_train(tiny_config):
    form = form_for(tiny_config)
    assert form.problems == [] and not form.train_button.disabled
    assert "ready to train" in form.summary.value


def test_class_prompt_holding_the_instance_token_shows_next_to_it(tiny_config):
    form = form_for(tiny_config)
    type_into(form, "class_prompt", "photo of zwx toy", concept=0)
    messages = shown(form, "class_prompt", concept=0)
    assert len(messages) == 1 and "holds the instance token 'zwx'" in messages[0]
    assert form.train_button.disabled
    assert form.concepts[0].fields["class_prompt"].message.layout.display is None  # visible
    assert "Concepts \u26a0 1" in titles_of(form.tabs)
    assert "Concept 1 \u00b7 Class prompt" in form.summary.value
    assert all(not c.shown for n, c in form.concepts[0].fields.items() if n != "class_prompt")
    type_into(form, "class_prompt", "photo of a toy", concept=0)
    assert shown(form, "class_prompt", concept=0) == [] and not form.train_button.disabled
    assert "Concepts" in titles_of(form.tabs)


def test_missing_folder_shows_next_to_it(tiny_config, tmp_path):
    form = form_for(tiny_config)
    missing = str(tmp_path / "nowhere")
    type_into(form, "instance_data_dir", missing, concept=0)
    assert any("does not exist" in m and missing in m
               for m in shown(form, "instance_data_dir", concept=0))
    assert form.train_button.disabled
    assert form.concepts[0].fields["instance_data_dir"].hint.value == ""
    (tmp_path / "nowhere").mkdir()
    form.refresh()  # the folder appeared outside the form
    assert shown(form, "instance_data_dir", concept=0) == []
    assert not form.train_button.disabled


def test_text_in_a_number_box_shows_and_blocks(tiny_config):
    form = form_for(tiny_config)
    type_into(form, "learning_rate", "fast")
    assert shown(form, "learning_rate") == ["'fast' is not a number"]
    assert form.train_button.disabled
    assert [p.where for p in form.problems] == ["learning_rate"]
    with pytest.raises(ValueError, match="learning_rate: 'fast' is not a number"):
        form.config
    type_into(form, "learning_rate", "3e-6")
    assert shown(form, "learning_rate") == [] and not form.train_button.disabled
    assert form.config.learning_rate == 3e-6


def test_range_and_cross_field_problems(tiny_config):
    form = form_for(tiny_config)
    type_into(form, "resolution", "100")  # in range, not a multiple of 64
    assert any("multiple of 64" in m for m in shown(form, "resolution"))
    type_into(form, "resolution", "4096")
    assert shown(form, "resolution") == ["4096 is above the maximum 2048"]
    type_into(form, "resolution", "64")
    type_into(form, "max_train_steps", "")
    type_into(form, "num_train_epochs", "")
    assert any("both blank" in m for m in shown(form, "max_train_steps"))
    type_into(form, "num_train_epochs", "2")
    assert form.problems == []


def test_blank_form_says_what_is_missing():
    form = form_for()
    assert form.train_button.disabled
    assert "no concept to train" in form.concepts_message.value
    form.add_concept()
    assert any("blank" in m for m in shown(form, "instance_prompt", concept=0))
    assert any("blank" in m for m in shown(form, "instance_data_dir", concept=0))
    assert form.concepts_message.value == ""


# ----------------------------------------------------------------------------- concepts
def test_add_and_remove_concepts(tiny_config, demo_root):
    form = form_for(tiny_config)
    second = Concept(instance_prompt="photo of qwe toy", class_prompt="",
                     instance_data_dir=str(demo_root / "data" / "class"))
    form.add_concept(second)
    assert len(form.concepts) == 2 and len(form.concepts_box.children) == 2
    assert form.config.concepts_list == tiny_config.concepts_list + [second]
    assert titles_of(form.concepts_box)[1] == "Concept 2: photo of qwe toy"
    assert form.concepts_box.selected_index == 1
    assert not form.train_button.disabled
    type_into(form, "class_prompt", "qwe toy", concept=1)
    type_into(form, "instance_token", "qwe", concept=1)
    assert any("instance token" in m for m in shown(form, "class_prompt", concept=1))
    assert shown(form, "class_prompt", concept=0) == []  # problems land on the right concept
    form.concepts[0].remove_button.click()
    assert len(form.concepts) == 1
    assert form.config.concepts_list[0].instance_prompt == "photo of qwe toy"
    assert any("instance token" in m for m in shown(form, "class_prompt", concept=0))
    assert titles_of(form.concepts_box)[0].startswith("Concept 1: photo of qwe toy")
    form.add_concept_button.click()
    assert len(form.config.concepts_list) == 2
    assert form.config.concepts_list[1] == dataclasses.replace(Concept())


# ----------------------------------------------------------------------------- params JSON
def test_save_and_load_params_round_trip(tiny_config, tmp_path):
    config = tiny_config.copy(seed=None, use_8bit_adam=None, learning_rate=3e-6)
    config.concepts_list.append(Concept(instance_prompt="photo of qwe cat",
                                        instance_data_dir=config.concepts_list[0].instance_data_dir))
    form = form_for(config)
    path = tmp_path / "saved" / "params.json"
    form.params_path.value = str(path)
    form.save_button.click()
    assert path.is_file() and "Saved" in form.params_status.value
    assert load_params(path) == config

    other = form_for()
    other.params_path.value = str(path)
    other.load_button.click()
    assert other.config == config
    assert "Loaded" in other.params_status.value and len(other.concepts) == 2


def test_load_params_reports_bad_files_and_keeps_the_form(tiny_config, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"learning_rat": 1e-6}), encoding="utf-8")
    form = form_for(tiny_config)
    form.params_path.value = str(bad)
    form.load_button.click()
    assert "Could not load" in form.params_status.value
    assert "did you mean" in form.params_status.value
    assert form.config == tiny_config
    form.params_path.value = str(tmp_path / "missing.json")
    form.load_button.click()
    assert "file not found" in form.params_status.value


def test_save_refuses_unparsed_boxes(tiny_config, tmp_path):
    form = form_for(tiny_config)
    type_into(form, "resolution", "big")
    form.params_path.value = str(tmp_path / "p.json")
    form.save_button.click()
    assert "Not saved" in form.params_status.value and not (tmp_path / "p.json").exists()


def test_extension_file_loads_into_the_form(tmp_path, demo_root):
    db_config = {"db_learning_rate": 1e-6, "txt_learning_rate": 5e-7, "optimizer": "8bit AdamW",
                 "not_cache_latents": True, "revision": 3, "pretrained_model_name_or_path": "tiny",
                 "concepts_list": [{"instance_prompt": "photo of sks dog",
                                    "instance_data_dir": str(demo_root / "data" / "instance"),
                                    "is_valid": True}]}
    path = tmp_path / "db_config.json"
    path.write_text(json.dumps(db_config), encoding="utf-8")
    form = form_for()
    form.load_params(path)
    config = form.config
    assert config.text_encoder_learning_rate == 5e-7 and config.use_8bit_adam is True
    assert config.cache_latents is False
    assert "ignored" in form.params_status.value and "revision" in form.params_status.value


def test_hidden_tabs_keep_their_values(tiny_config):
    form = form_for(tiny_config, tabs=["Model", "Concepts"], show_train=False)
    assert titles_of(form.tabs) == ("Model", "Concepts")
    assert form.train_button not in list(walk(form.widget))
    assert form.config == tiny_config


# ----------------------------------------------------------------------------- notebook 01
def test_save_uploads_never_overwrites(tmp_path):
    folder = tmp_path / "instance"
    folder.mkdir()
    (folder / "dog.png").write_bytes(b"old png")
    (folder / "same.png").write_bytes(b"same bytes")
    result = save_uploads([
        {"name": "dog.png", "content": memoryview(b"new png")},
        {"name": "dog.txt", "content": b"a photo of a dog"},
        {"name": "same.png", "content": b"same bytes"},
        {"name": "../../escape.jpg", "content": b"jpg"},
        {"name": "phone.HEIC", "content": b"heic"},
        {"name": ".hidden.png", "content": b"x"},
    ], folder)
    assert (folder / "dog.png").read_bytes() == b"old png"  # the user's file is untouched
    assert (folder / "dog (1).png").read_bytes() == b"new png"
    assert (folder / "dog (1).txt").read_text() == "a photo of a dog"  # caption follows its image
    assert result.renamed == {"dog.png": "dog (1).png", "dog.txt": "dog (1).txt"}
    assert (folder / "escape.jpg").is_file() and not (tmp_path / "escape.jpg").exists()
    assert not (folder / "phone.HEIC").exists()
    assert sorted(p.name for p in folder.iterdir()) == [
        "dog (1).png", "dog (1).txt", "dog.png", "escape.jpg", "same.png"]
    assert any("same.png: already" in s for s in result.skipped)
    assert any("phone.HEIC" in s and "HEIC" in s for s in result.skipped)
    assert len(result.skipped) == 3


def test_upload_box_saves_and_clears(tmp_path, demo_root):
    png = (demo_root / "data" / "instance" / "star_00.png").read_bytes()
    seen = []
    box = UploadBox(tmp_path / "up", on_saved=seen.append)
    browser_upload(box.upload, "star.png", png)
    assert (tmp_path / "up" / "star.png").read_bytes() == png
    assert not box.upload.value and "saved 1 file" in box.status.value
    assert len(seen) == 1 and seen[0].saved == [tmp_path / "up" / "star.png"]


def browser_upload(upload: w.FileUpload, name: str, content: bytes) -> None:
    """Set the upload box's state as the browser does after a file is picked, per version."""
    if IPYWIDGETS_MAJOR >= 8:
        upload.value = ({"name": name, "type": "image/png", "size": len(content),
                         "content": memoryview(content),
                         "last_modified": datetime.now(timezone.utc)},)
    else:  # 7 receives metadata and data lists, then a counter that assembles the value
        upload.set_state({"metadata": [{"name": name, "type": "image/png",
                                        "size": len(content), "lastModified": 0}],
                          "data": [memoryview(content)], "_counter": upload._counter + 1})


def test_caption_grid_and_crop_preview(demo_root, tmp_path):
    folder = demo_root / "data" / "instance"
    grid = caption_grid(folder, size=64, columns=3)
    assert grid is not None and grid.width == 3 * 64 and grid.height > 2 * 64  # 6 images, labels
    preview = crop_preview(folder, 64, count=2, size=48)
    assert preview is not None and preview.width == 3 * 48 and preview.height > 2 * 48
    assert caption_grid(tmp_path) is None and crop_preview(tmp_path / "missing", 64) is None
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert caption_grid(tmp_path, size=32).width == 32  # shown as unreadable, not a crash


def test_data_report(tiny_config, tmp_path):
    report = data_report(tiny_config)
    assert report.ok and report.instance_images == 6 and report.class_images == {0: 12}
    assert report.prompts[0][1].count("zwx") == 1
    assert "No problem stops training" in report._repr_html_()
    bad = tiny_config.copy(concepts_list=[dataclasses.replace(
        tiny_config.concepts_list[0], class_prompt="zwx toy",
        instance_data_dir=str(tmp_path / "none"))])
    report = data_report(bad)
    assert not report.ok
    text = str(report)
    assert "class_prompt" in text and str(tmp_path / "none") in text


def test_prepare_config_for_notebook_01(tmp_path):
    work = tmp_path / "work"
    config, notes = prepare_config(work, base_model="tiny", instance_prompt="photo of sks dog",
                                   class_prompt="photo of a dog", num_class_images=5,
                                   resolution=256)
    assert notes == [] and config.models_root == str(work) and config.resolution == 256
    concept = config.concepts_list[0]
    assert Path(concept.instance_data_dir) == work / "data" / "instance"
    assert (concept.instance_prompt, concept.num_class_images) == ("photo of sks dog", 5)
    assert not any((work / "data").rglob("*.png"))  # no demo data unless asked for

    save_params(config.copy(learning_rate=4e-6), params_file(work))
    again, notes = prepare_config(work, base_model="tiny", instance_prompt="photo of sks cat",
                                  class_prompt="", resolution=512)
    assert again.learning_rate == 4e-6  # kept from params.json
    assert again.concepts_list[0].instance_prompt == "photo of sks cat" and "Continuing" in notes[0]

    demo, notes = prepare_config(tmp_path / "fresh", base_model="tiny", instance_prompt="x",
                                 class_prompt="", resolution=64, demo_if_empty=True)
    assert "demo subject" in notes[0] and demo.resolution == 64
    assert len(list(Path(demo.concepts_list[0].instance_data_dir).glob("*.png"))) == 6


def test_unattended_demo_subject_is_drawn_at_the_default_resolution(tmp_path):
    """Notebook 01's default (512) used to get a 128 px subject that 02 then found unusable."""
    demo, _ = prepare_config(tmp_path / "w", base_model="tiny", instance_prompt="x",
                             class_prompt="", resolution=512, demo_if_empty=True)
    images = sorted(Path(demo.concepts_list[0].instance_data_dir).glob("*.png"))
    assert demo.resolution == 512 and {Image.open(p).size for p in images} == {(512, 512)}
    report = data_report(demo)
    assert not report.errors, report.errors


def test_work_folders_on_an_unmounted_drive_are_refused(tmp_path, monkeypatch):
    from colab_dreambooth.runtime import environment as runtime

    monkeypatch.setattr(runtime, "DRIVE_MOUNT", tmp_path / "content" / "drive")
    monkeypatch.setattr(runtime, "on_colab", lambda: False)
    work = tmp_path / "content" / "drive" / "MyDrive" / "dreambooth"
    with pytest.raises(runtime.DriveNotMounted, match="only available on Colab"):
        prepare_config(work, base_model="tiny", instance_prompt="x", class_prompt="")
    with pytest.raises(runtime.DriveNotMounted):
        training_config(work, base_model="tiny")
    assert not (tmp_path / "content").exists()


def test_training_config_for_notebook_03(tmp_path, tiny_config):
    config, notes = training_config(tmp_path, base_model="tiny", steps=None)
    assert config.pretrained_model_name_or_path == "tiny" and "run 01" in notes[0]
    save_params(tiny_config, params_file(tmp_path))
    config, _ = training_config(tmp_path, base_model="ignored", steps=3, resolution=128)
    assert config == tiny_config.copy(max_train_steps=3, resolution=128)


# ----------------------------------------------------------------------------- training view
def test_loss_curve_draws_any_length():
    assert loss_curve([], (200, 100)).size == (200, 100)
    assert loss_curve([0.5], (200, 100)).size == (200, 100)
    image = loss_curve([1.0 / (k + 1) for k in range(5000)], (300, 120), total_steps=6000)
    assert image.size == (300, 120)
    assert len(set(image.getdata())) > 2  # something was drawn
    assert smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])


def test_estimate_total_steps(tiny_config):
    # demo data: 6 instance images, batch 2 -> 3 steps per epoch
    assert estimate_total_steps(tiny_config) == 6
    assert estimate_total_steps(tiny_config.copy(max_train_steps=None, num_train_epochs=4)) == 12
    assert estimate_total_steps(tiny_config.copy(concepts_path="/no/such.json")) is None


def test_training_view_stop_button_ends_the_run_with_the_model_saved(tiny_config):
    config = without_class_images(tiny_config).copy(max_train_steps=6, save_preview_every=1,
                                                    train_batch_size=1)
    config.concepts_list[0].n_save_sample = 1
    config.concepts_list[0].save_infer_steps = 2
    view = TrainingView(plot_interval=0)
    seen = []

    def at_step(step, loss, lr):
        seen.append(step)
        if step == 2:
            view.stop_button.click()

    result = view.run(config, background=False, on_step=at_step)
    assert result.stopped_early and result.steps == 2 and seen == [1, 2]
    assert (result.model_dir / "model_index.json").is_file()
    assert json.loads((result.model_dir / "training_info.json").read_text())["steps"] == 2
    assert view.progress.value == 2 and view.progress.max == 6
    assert view.progress.bar_style == "warning" and "Stopped at step 2 of 6" in view.status.value
    assert view.stop_button.disabled and not view.running
    assert "loss" in view.label.value and len(view.losses) == 2
    assert Image.open(io.BytesIO(view.loss_image.value)).size == view.plot_size
    # The preview grid written when the run ended shows inline.
    assert view.preview.layout.display is None and view.preview.value[:4] == b"\x89PNG"
    assert "epoch-0001-grid.png" in view.preview_caption.value
    assert "Seed" in view.log.value


def test_training_view_shows_errors_and_reraises_in_the_foreground(tiny_config, tmp_path):
    config = tiny_config.copy(concepts_list=[dataclasses.replace(
        tiny_config.concepts_list[0], instance_data_dir=str(tmp_path / "gone"))])
    view = TrainingView()
    with pytest.raises(ValueError, match="gone"):
        view.run(config, background=False)
    assert "Training failed" in view.status.value and view.progress.bar_style == "danger"


def test_train_app_background_run_and_stop(tiny_config, tmp_path):
    config = without_class_images(tiny_config).copy(max_train_steps=50,
                                                    train_text_encoder=False)
    app = TrainApp(config, params_path=tmp_path / "params.json", device=CPU)
    app.form.train_button.click()  # trains in a background thread
    assert app.form.busy and app.form.train_button.disabled and app.view.running
    deadline = time.time() + 120
    while not app.view.losses and app.view.running and time.time() < deadline:
        time.sleep(0.05)
    assert app.view.losses, f"no training step: {app.view.error!r}"
    app.view.stop_button.click()  # from this (the notebook's) thread, as a user would
    result = app.view.wait(120)
    assert result is not None and result.stopped_early and result.steps < 50
    assert (result.model_dir / "model_index.json").is_file()
    assert load_params(tmp_path / "params.json") == config  # saved before training
    assert not app.form.busy and not app.form.train_button.disabled
    assert "stopped early" in app.describe_result()
    with pytest.raises(ValueError):
        TrainApp(DreamBoothConfig(), params_path=tmp_path / "p.json", device=CPU).train()


def test_train_app_stop_then_resume(tiny_config, tmp_path):
    """The Stop button leaves a checkpoint; the resume switch continues it."""
    config = without_class_images(tiny_config).copy(max_train_steps=50, train_text_encoder=False)
    app = TrainApp(config, params_path=tmp_path / "params.json", device=CPU)
    assert app.resume.value is False
    app.form.train_button.click()
    deadline = time.time() + 120
    while len(app.view.losses) < 2 and app.view.running and time.time() < deadline:
        time.sleep(0.05)
    app.view.stop_button.click()
    first = app.view.wait(120)
    assert first.stopped_early and first.checkpoint is not None

    again = TrainApp(config.copy(max_train_steps=first.steps + 2),
                     params_path=tmp_path / "params.json", device=CPU, resume=True)
    assert again.resume.value is True
    result = again.train(background=False)
    assert result.resumed_from == first.checkpoint and result.steps == first.steps + 2
    assert result.losses[:first.steps] == first.losses


def interrupt_at(progress: w.IntProgress, value: int) -> list[int]:
    """Send this process a SIGINT (Colab's stop button) when ``progress`` reaches ``value``;
    returns the thread idents of every update, to tell which thread the job ran in."""
    import signal
    import threading

    threads: list[int] = []
    # What a kernel has; a process started in the background by a non-interactive shell (as
    # CI may be) inherits SIGINT ignored instead, and the interrupt would never arrive.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_value(change) -> None:
        threads.append(threading.get_ident())
        if change["new"] == value:
            signal.raise_signal(signal.SIGINT)

    progress.observe(on_value, names="value")
    return threads


def test_on_colab_train_runs_in_the_cell_and_an_interrupt_is_the_stop(tiny_config, tmp_path,
                                                                     monkeypatch):
    """Colab redraws only what the kernel's own thread changes: the Train button trains there,
    the view follows each step, and Colab's stop (SIGINT) ends the run like Stop, with the
    model, a checkpoint and the hint to resume."""
    import threading

    import widgets.app

    monkeypatch.setattr(widgets.app, "jobs_in_foreground", lambda: True)
    config = without_class_images(tiny_config).copy(max_train_steps=50, train_text_encoder=False)
    app = TrainApp(config, params_path=tmp_path / "params.json", device=CPU)
    threads = interrupt_at(app.view.progress, 2)
    app.form.train_button.click()  # returns when the run has ended: it ran right here
    assert app.view.job.thread is None and set(threads) == {threading.get_ident()}
    result = app.view.result
    assert result is not None and result.stopped_early and result.steps == 2
    assert result.checkpoint is not None and (result.model_dir / "model_index.json").is_file()
    assert "RESUME = True" in app.view.status.value and "Stopped at step 2" in app.view.status.value
    assert not app.form.busy and not app.form.train_button.disabled


def test_on_colab_class_images_run_in_the_cell_and_an_interrupt_keeps_them(
        tiny_config, tmp_path, monkeypatch, one_thread):
    import threading

    import widgets.class_images

    monkeypatch.setattr(widgets.class_images, "jobs_in_foreground", lambda: True)
    concept = dataclasses.replace(tiny_config.concepts_list[0], class_prompt="a photo of a toy",
                                  class_data_dir="", num_class_images=3, class_infer_steps=2)
    config = tiny_config.copy(concepts_list=[concept], sample_batch_size=1)
    app = ClassImagesApp(config, params_path=tmp_path / "params.json", device=CPU)
    threads = interrupt_at(app.progress, 1)
    app.generate_button.click()
    assert app.job.thread is None and set(threads) == {threading.get_ident()}
    assert app.error is None and "Stopped" in app.status.value
    assert len(list(config.class_dir(0).glob("*.png"))) == 1  # the one made is kept, whole
    assert "1</b> of 3" in app.counts.value


def test_core_package_never_imports_ipywidgets():
    core = Path(__file__).resolve().parent.parent / "colab_dreambooth"
    offenders = [p.name for p in core.rglob("*.py") if "ipywidgets" in p.read_text("utf-8")]
    assert offenders == []


# ----------------------------------------------------------------------------- notebook 02
def test_a_partial_form_shows_only_its_fields_and_keeps_the_others(tiny_config):
    form = form_for(tiny_config, only=CLASS_IMAGE_FIELDS, show_train=False)
    assert form.tab_names == ["Model", "Parameters", "Advanced", "Concepts"]
    shown_labels = {label_of(x) for x in walk(form.widget) if getattr(x, "description", "")}
    assert {"Base model", "Resolution", "Class batch size", "Class prompt",
            "Total Number of Class/Reg Images", "Classification Steps"} <= shown_labels
    assert not {"Learning rate", "Instance prompt", "Sample Image Prompt", "Model name",
                "Add concept", "Remove this concept"} & shown_labels
    assert form.config == tiny_config  # the hidden fields keep their values
    assert form.shows("concept 1 class_prompt") and form.shows("concept 1")
    assert not form.shows("learning_rate") and not form.shows("concept 1 instance_prompt")
    assert "these settings are ready" in form.summary.value


def test_class_images_app_counts_generates_and_shows_them(tiny_config, tmp_path, one_thread):
    concept = dataclasses.replace(tiny_config.concepts_list[0], class_prompt="a photo of a toy",
                                  class_data_dir="", num_class_images=2, class_infer_steps=2)
    config = tiny_config.copy(concepts_list=[concept], sample_batch_size=2)
    params = tmp_path / "params.json"
    app = ClassImagesApp(config, params_path=params, device=CPU)
    folder = config.class_dir(0)
    assert [(c.wanted, c.existing, c.missing) for c in count_class_images(config)] == [(2, 0, 2)]
    assert "0</b> of 2" in app.counts.value and "2 to generate" in app.counts.value
    assert app.form.tab_names[app.form.tabs.selected_index] == "Concepts"

    type_into(app.form, "class_prompt", "a photo of zwx toy", concept=0)  # holds the token
    assert app.generate_button.disabled
    with pytest.raises(ValueError, match="instance token"):
        app.generate(background=False)
    type_into(app.form, "class_prompt", "a photo of a toy", concept=0)
    assert not app.generate_button.disabled

    reports = app.generate(background=False)
    assert [r.generated for r in reports] == [2] and len(list(folder.glob("*.png"))) == 2
    assert load_params(params) == config  # saved before generating
    assert app.progress.value == 2 and app.progress.bar_style == "success"
    assert "generated 2 class images" in app.status.value and "complete" in app.counts.value
    assert app.grid.layout.display is None and app.grid.value[:4] == b"\x89PNG"
    type_into(app.form, "num_class_images", "3", concept=0)
    assert "2</b> of 3" in app.counts.value and "1 to generate" in app.counts.value
    assert app.grid_image().width > 0


def test_class_images_config_for_notebook_02(tmp_path, tiny_config):
    save_params(tiny_config, params_file(tmp_path))
    config, notes = class_images_config(tmp_path, base_model="ignored", num_class_images=20,
                                        class_steps=5)
    concept = config.concepts_list[0]
    assert (concept.num_class_images, concept.class_infer_steps) == (20, 5) and "Loaded" in notes[0]
    config, _ = class_images_config(tmp_path, base_model="ignored")
    assert config == tiny_config


# ----------------------------------------------------------------------------- notebook 04
def test_release_app_form_checks_its_settings(tiny_config):
    settings = ReleaseSettings(fp16=False, destination="/content/drive/MyDrive/models")
    app = ReleaseApp(tiny_config, settings, sample_prompt="a photo of zwx toy")
    assert app.settings == settings and app.prompt.value == "a photo of zwx toy"
    assert "not found" in app.header.value  # nothing trained in this models root yet
    assert app.fields["export_name"].input.placeholder == "blank = test-model"
    assert not app.release_button.disabled and app.message.value == ""
    app.fields["destination"].input.value = "hf://no-user-part"
    assert app.release_button.disabled and "Send to" in app.message.value
    app.fields["destination"].input.value = "hf://me/my-model"
    app.fields["dehydrate_rank"].input.value = "many"
    assert app.release_button.disabled and "dehydrate_rank" in app.message.value
    app.fields["dehydrate_rank"].input.value = "64"
    assert app.settings.dehydrate_rank == 64 and not app.release_button.disabled


def test_release_config_for_notebook_04(tmp_path, tiny_config):
    save_params(tiny_config, params_file(tmp_path))
    config, _ = release_config(tmp_path, base_model="ignored", n_samples=1, sample_steps=3)
    assert (config.concepts_list[0].n_save_sample, config.concepts_list[0].save_infer_steps) \
        == (1, 3)


def test_lora_type_fields_show_only_where_they_apply(tiny_config):
    form = form_for(tiny_config.copy(use_lora=False))
    shown = lambda name: form.fields[name].widget.layout.display != "none"  # noqa: E731
    assert not shown("lora_type") and not shown("lora_conv_rank") and not shown("use_dora")
    type_into(form, "use_lora", True)
    assert shown("lora_type") and shown("use_dora") and not shown("lora_conv_rank")
    type_into(form, "lora_type", "LoHa")
    assert shown("lora_conv_rank") and shown("lora_conv_alpha") and not shown("use_dora")
    type_into(form, "lora_conv_rank", "8")
    type_into(form, "lora_type", "LoRA")
    assert not shown("lora_conv_rank") and form.config.lora_conv_rank == 8  # value kept


def test_an_sdxl_base_model_brings_its_resolution(tiny_config):
    """Choosing an SDXL model proposes 1024 px (its training size), and going back to SD 1.x
    gives 512 again; a resolution the user typed stays whatever the model."""
    form = form_for(tiny_config.copy(resolution=512))
    base = form.fields["pretrained_model_name_or_path"].input
    base.value = "stabilityai/stable-diffusion-xl-base-1.0"
    assert form.config.resolution == 1024
    base.value = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert form.config.resolution == 512
    form.fields["resolution"].set(640)
    base.value = "tiny-sdxl"
    assert form.config.resolution == 640
