"""Automatic captions (data/captioning.py, ``colab-dreambooth caption``) on the real tiny
captioner and tagger and real image files: every uncaptioned image gets a caption, none is
overwritten unless asked, the images are never touched, and the tokens sit where the
``[filewords]`` prompt builder expects them."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

from colab_dreambooth.cli import main
from colab_dreambooth.config.concept import Concept
from colab_dreambooth.config.prompts import EXISTING_PROMPT_CONTENTS, build_prompts, contains_token
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.data.captioners import (
    CAPTION,
    CHARACTER,
    GENERAL,
    RATING,
    TAGS,
    Tag,
    format_tag,
    load_captioner,
    looks_like_tagger,
    select_tags,
)
from colab_dreambooth.data.captioning import (
    FAILED,
    KEPT,
    WRITTEN,
    CaptionError,
    CaptionTokens,
    place_tokens,
    save_edited_captions,
    write_captions,
)
from colab_dreambooth.data.captions import read_caption
from colab_dreambooth.errors import ModelLoadError
from widgets import CaptionApp, ConfigForm
from widgets.captioning import TAGS as TAGS_CHOICE


@pytest.fixture(scope="module", autouse=True)
def _own_cache(tmp_path_factory):
    """The tiny models in a cache of this module, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLAB_DREAMBOOTH_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def tiny_blip(one_thread):
    return load_captioner("tiny")


@pytest.fixture(scope="module")
def tiny_tagger(one_thread):
    return load_captioner("tiny", tagger=True)


def make_folder(folder: Path) -> Path:
    """PNGs and JPEGs of different sizes and colours, one corrupt, one with a ``.txt``
    caption, one with an upper-case ``.TXT`` caption, and a file that is no image."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (size, colour) in enumerate([((40, 30), (200, 40, 40)), ((24, 48), (30, 200, 60)),
                                        ((64, 64), (20, 40, 220)), ((50, 20), (240, 240, 20))]):
        Image.new("RGB", size, colour).save(folder / f"photo_{i}.png")
    Image.new("RGB", (36, 36), (120, 60, 200)).save(folder / "holiday.jpg", quality=90)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("RGB", (32, 32), (9, 9, 9)).save(folder / "mine.png")
    (folder / "mine.txt").write_text("my own caption of sks dog\n", encoding="utf-8")
    Image.new("RGB", (32, 32), (99, 9, 9)).save(folder / "windows.png")
    (folder / "windows.TXT").write_text("an upper-case caption", encoding="utf-8")
    (folder / "notes.md").write_text("not an image", encoding="utf-8")
    return folder


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def caption_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.suffix.lower() == ".txt"}


def assert_holds_tokens(caption: str, token: str, word: str) -> None:
    """The caption holds both, and trains as "Instance Token + Class Token + Description"."""
    assert contains_token(caption, token) and contains_token(caption, word)
    instance, klass = build_prompts(caption, "[filewords]", "[filewords]", token, word,
                                    "Instance Token + Class Token + Description")
    assert instance == caption and not contains_token(klass, token)


UNCAPTIONED = ["holiday.jpg", "photo_0.png", "photo_1.png", "photo_2.png", "photo_3.png"]


@pytest.mark.parametrize("kind", [CAPTION, TAGS])
def test_every_uncaptioned_image_gets_a_caption_and_none_is_overwritten(
        tmp_path, kind, tiny_blip, tiny_tagger):
    folder = make_folder(tmp_path / "images")
    before = digests(folder)
    captioner = tiny_blip if kind == CAPTION else tiny_tagger
    assert captioner.kind == kind
    report = write_captions(folder, captioner, progress=False)

    assert sorted(r.image.name for r in report.of(WRITTEN)) == UNCAPTIONED
    assert sorted(r.image.name for r in report.of(KEPT)) == ["mine.png", "windows.png"]
    [failed] = report.of(FAILED)
    assert failed.image.name == "broken.jpg" and "unreadable image" in failed.note
    for row in report.of(WRITTEN):
        text = (folder / (Path(row.image).stem + ".txt")).read_text(encoding="utf-8")
        assert text.strip() == row.caption and row.caption.strip()
        assert read_caption(row.image) == row.caption  # training reads what was written
    # Nothing that was there changed: images, the .txt and the .TXT captions, the rest.
    after = digests(folder)
    assert {name: after[name] for name in before} == before
    assert caption_files(folder) == {"mine.txt", "windows.TXT"} | {
        Path(n).stem + ".txt" for n in UNCAPTIONED}
    assert "broken.txt" not in caption_files(folder)

    again = write_captions(folder, captioner, progress=False)  # a rerun writes nothing
    assert not again.of(WRITTEN) and digests(folder) == after
    assert "5 caption(s) written, 2 kept, 1 image(s) unreadable" in report.summary()
    assert "mine.png" in str(report) and "[kept" in str(report)


def test_overwrite_replaces_captions_but_never_images(tmp_path, tiny_blip):
    folder = make_folder(tmp_path / "images")
    before = digests(folder)
    report = write_captions(folder, tiny_blip, overwrite=True, batch_size=3, progress=False)
    assert len(report.of(WRITTEN)) == 7 and len(report.of(FAILED)) == 1
    after = digests(folder)
    assert after["mine.txt"] != before["mine.txt"]
    assert after["windows.TXT"] != before["windows.TXT"]  # the upper-case file, replaced
    assert "windows.txt" not in caption_files(folder)  # not a second caption beside it
    images = [n for n in before if not n.lower().endswith(".txt")]
    assert {n: after[n] for n in images} == {n: before[n] for n in images}


def test_the_tiny_captioners_are_deterministic_and_image_dependent(tmp_path, tiny_blip,
                                                                   tiny_tagger):
    images = [Image.new("RGB", (40, 40), colour) for colour in
              [(250, 10, 10), (10, 10, 250), (250, 250, 250), (0, 0, 0)]]
    for captioner in (tiny_blip, tiny_tagger):
        first = captioner.caption(images)
        assert first == captioner.caption(images)
        assert all(text.strip() for text in first)
        assert len(set(first)) > 1  # the image matters
    tags = [t for text in tiny_tagger.caption(images) for t in text.split(", ")]
    assert not {"general", "sensitive"} & set(tags)  # rating tags never written
    assert not any("_" in t for t in tags if len(t) > 3)


def test_an_empty_generation_falls_back_and_says_so(tmp_path):
    class Silent:
        kind, name = CAPTION, "silent"

        def caption(self, images):
            return [""] * len(images)

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "red_dog_01.png")
    Image.new("RGB", (16, 16)).save(folder / "0001.png")
    report = write_captions(folder, Silent(), progress=False)
    assert [r.caption for r in report.rows] == ["a picture", "red dog"]
    assert all("generated nothing" in r.note for r in report.rows)


# ----------------------------------------------------------------------------- tokens
class Fixed:
    """A captioner that always says the same: exact prompts can be checked."""

    def __init__(self, text: str, kind: str = CAPTION) -> None:
        self.text, self.kind, self.name = text, kind, "fixed"

    def caption(self, images):
        return [self.text] * len(images)


@pytest.mark.parametrize("mode, caption, instance, klass", [
    ("Description", "a dog sitting on grass",
     "sks dog sitting on grass", "a dog sitting on grass"),
    ("Description", "a man on a bench",
     "sks dog, a man on a bench", "dog, a man on a bench"),
    ("Class Token + Description", "a photo of a dog on grass",
     "a photo of sks dog on grass", "a photo of a dog on grass"),
    ("Instance Token + Description", "a man on a bench",
     "sks dog, a man on a bench", "dog, a man on a bench"),
    ("Instance Token + Description", "a photo of a dog on grass",
     "a photo of sks dog on grass", "a photo of dog on grass"),
    ("Instance Token + Class Token + Description", "a man on a bench",
     "sks dog, a man on a bench", "dog, a man on a bench"),
    ("Instance Token + Class Token + Description", "a dog sitting on grass",
     "sks dog sitting on grass", "dog sitting on grass"),
])
def test_written_captions_build_the_extensions_prompts(tmp_path, mode, caption, instance, klass):
    """The caption written for each Existing Prompt Contents gives, through the [filewords]
    builder, the prompts the extension's rules give (fields.md's table)."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "a.png")
    tokens = CaptionTokens("sks", "dog", mode)
    write_captions(folder, Fixed(caption), tokens=tokens, progress=False)
    written = read_caption(folder / "a.png")
    built = build_prompts(written, "[filewords]", "[filewords]", "sks", "dog", mode,
                          caption_file=folder / "a.txt")
    assert built == (instance, klass)
    assert contains_token(written, "sks") == mode.startswith("Instance Token")


@pytest.mark.parametrize("mode", EXISTING_PROMPT_CONTENTS)
@pytest.mark.parametrize("kind, text", [(CAPTION, "a man and a woman on a beach"),
                                        (CAPTION, "a red car"), (TAGS, "1girl, solo, smile"),
                                        (TAGS, "woman, solo, long hair")])
def test_every_mode_gives_valid_prompts(mode, kind, text):
    tokens = CaptionTokens("ohwx", "a woman, woman", mode)
    written = place_tokens(text, tokens, kind)
    instance, klass = build_prompts(written, "[filewords]", "photo, [filewords]", "ohwx",
                                    "a woman, woman", mode)
    assert contains_token(instance, "ohwx") and contains_token(instance, "woman")
    assert not contains_token(klass, "ohwx")
    assert instance.lower().count("woman") <= max(text.lower().count("woman"), 1)  # no doubling
    assert contains_token(written, "ohwx") == mode.startswith("Instance Token")


@pytest.mark.parametrize("mode, expected", [
    ("Description", "dog, 1girl, solo"),
    ("Class Token + Description", "dog, 1girl, solo"),
    ("Instance Token + Description", "sks, 1girl, solo"),
    ("Instance Token + Class Token + Description", "sks, dog, 1girl, solo"),
])
def test_tags_start_with_the_tokens_for_keep_tokens(mode, expected):
    tokens = CaptionTokens("sks", "dog", mode)
    assert place_tokens("1girl, dog, solo", tokens, TAGS) == expected


def test_no_tokens_leave_the_caption_and_a_needed_token_is_asked_for(tmp_path):
    assert place_tokens(" a  dog ,", None) == "a dog"
    assert place_tokens("a cat", CaptionTokens()) == "a cat"
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "a.png")
    with pytest.raises(CaptionError, match="Instance Token"):
        write_captions(folder, Fixed("a dog"), progress=False,
                       tokens=CaptionTokens("", "dog", "Instance Token + Description"))
    with pytest.raises(CaptionError, match="Existing Prompt Contents"):
        place_tokens("a dog", CaptionTokens("sks", "dog", "Tokens first"))
    assert not (folder / "a.txt").exists()
    with pytest.raises(CaptionError, match="does not exist"):
        write_captions(tmp_path / "nowhere", Fixed("a dog"), progress=False)


# ----------------------------------------------------------------------------- tags
def test_select_tags_follows_kohyas_wd14_rules():
    tags = [Tag("general", RATING), Tag("explicit", RATING), Tag("long_hair", GENERAL),
            Tag("ganyu_(genshin_impact)", CHARACTER), Tag("^_^", GENERAL), Tag("solo", GENERAL),
            Tag("hat", GENERAL), Tag("other_(char)", CHARACTER), Tag("solo", GENERAL)]
    scores = [0.99, 0.9, 0.5, 0.9, 0.8, 0.36, 0.2, 0.6, 0.4]
    assert select_tags(tags, scores) == [
        "ganyu \\(genshin impact\\)", "^_^", "long hair", "solo"]
    assert select_tags(tags, scores, general_threshold=0.1, character_threshold=0.5)[:2] == [
        "ganyu \\(genshin impact\\)", "other \\(char\\)"]
    assert format_tag("o_o") == "o_o" and format_tag("blue_sky", remove_underscore=False) == \
        "blue_sky"


def test_tagger_names_and_missing_timm(tmp_path):
    assert looks_like_tagger("SmilingWolf/wd-vit-tagger-v3")
    assert not looks_like_tagger("Salesforce/blip-image-captioning-large")
    (tmp_path / "selected_tags.csv").write_text("tag_id,name,category,count\n")
    assert looks_like_tagger(str(tmp_path))
    if importlib.util.find_spec("timm") is None:
        with pytest.raises(ModelLoadError, match="pip install timm"):
            load_captioner("SmilingWolf/wd-vit-tagger-v3")


def test_a_missing_local_model_folder_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_captioner(str(tmp_path / "no-such-blip"))


def test_save_edited_captions(tmp_path):
    folder = make_folder(tmp_path / "images")
    written = save_edited_captions([(folder / "windows.png", " edited \n words "),
                                    (folder / "photo_0.png", "new one"),
                                    (folder / "photo_1.png", "   ")])
    assert written == [folder / "windows.TXT", folder / "photo_0.txt"]
    assert read_caption(folder / "windows.png") == "edited words"
    assert not (folder / "photo_1.txt").exists()


# ----------------------------------------------------------------------------- command line
def test_caption_command_end_to_end(tmp_path, capsys, tiny_blip):
    folder = make_folder(tmp_path / "images")
    before = digests(folder)
    code = main(["caption", str(folder), "--model", "tiny", "--instance-token", "sks",
                 "--class-token", "dog", "--existing-prompt-contents",
                 "Instance Token + Class Token + Description", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "5 caption(s) written, 2 kept, 1 image(s) unreadable" in out
    assert "broken.jpg" in out and "mine.png" in out
    for name in UNCAPTIONED:  # the tiny model's words may hold "dog": no exact text here
        assert_holds_tokens(read_caption(folder / name), "sks", "dog")
    after = digests(folder)
    assert {n: after[n] for n in before} == before

    assert main(["caption", str(folder), "--model", "tiny", "--no-progress"]) == 0
    assert "0 caption(s) written, 7 kept" in capsys.readouterr().out
    assert digests(folder) == after


def test_caption_command_takes_the_concept_from_params(tmp_path, capsys, tiny_blip):
    folder = make_folder(tmp_path / "images")
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"pretrained_model_name_or_path": "tiny", "concepts_list": [
        {"instance_data_dir": str(folder), "instance_prompt": "[filewords]",
         "instance_token": "ohwx", "class_token": "cat",
         "file_prompt_contents": "Instance Token + Description"}]}), encoding="utf-8")
    assert main(["caption", "--params", str(params), "--model", "tiny", "--tagger",
                 "--no-progress"]) == 0
    assert read_caption(folder / "photo_0.png").startswith("ohwx, ")
    out = capsys.readouterr().out
    assert "(tiny tagger)" in out and "[filewords]" not in out

    # A concept whose prompts read no caption is told so (kohya users expect them read).
    data = json.loads(params.read_text(encoding="utf-8"))
    data["concepts_list"][0]["instance_prompt"] = "photo of ohwx cat"
    params.write_text(json.dumps(data), encoding="utf-8")
    assert main(["caption", "--params", str(params), "--model", "tiny", "--no-progress"]) == 0
    assert "holds no [filewords]" in capsys.readouterr().out
    assert main(["caption", "--params", str(params), "--concept", "3"]) == 1
    assert "has 1 concept" in capsys.readouterr().err


def test_caption_command_errors(tmp_path, capsys):
    assert main(["caption", str(tmp_path / "nowhere"), "--model", "tiny"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["caption"]) == 1
    assert "FOLDER" in capsys.readouterr().err
    folder = make_folder(tmp_path / "images")
    assert main(["caption", str(folder), "--model", "tiny", "--existing-prompt-contents",
                 "Instance Token + Description"]) == 1
    assert "Instance Token" in capsys.readouterr().err
    assert "photo_0.txt" not in caption_files(folder)


# ----------------------------------------------------------------------------- notebook 01
def test_caption_step_writes_shows_and_saves_edits(tmp_path, tiny_blip):

    folder = make_folder(tmp_path / "images")
    before = digests(folder)
    config = DreamBoothConfig(pretrained_model_name_or_path="tiny", concepts_list=[Concept(
        instance_prompt="[filewords]", instance_data_dir=str(folder), instance_token="sks",
        class_token="dog", file_prompt_contents="Instance Token + Class Token + Description")])
    form = ConfigForm(config, tabs=["Model", "Concepts"], show_train=False)
    app = CaptionApp.for_form(form, model="tiny")
    report = app.run()
    assert report is not None and len(report.of(WRITTEN)) == 5
    assert "5 caption(s) written, 2 kept" in app.status.value
    assert len(app.editors) == 7 and not app.save_button.disabled  # every readable image
    assert "broken.jpg" in str([c.value for c in app.table.children if hasattr(c, "value")])
    for name in UNCAPTIONED:
        assert_holds_tokens(read_caption(folder / name), "sks", "dog")
    after = digests(folder)
    assert {n: after[n] for n in before} == before

    # Edit two captions in the table and save: only those files change.
    names = [r.image.name for r in app.rows]
    app.editors[names.index("mine.png")].value = "sks dog, edited by hand"
    app.editors[names.index("photo_0.png")].value = "sks dog on a  sofa"
    assert app.save() == [folder / "mine.txt", folder / "photo_0.txt"]
    assert read_caption(folder / "mine.png") == "sks dog, edited by hand"
    assert read_caption(folder / "photo_0.png") == "sks dog on a sofa"
    assert app.save() == []  # nothing changed since

    # The tagger through the same step; Overwrite replaces, a bad concept number is said.
    app.kind.value = TAGS_CHOICE
    assert app.model.value == "tiny"  # a typed model is kept when the kind changes
    app.overwrite.value = True
    assert len(app.run().of(WRITTEN)) == 7
    assert read_caption(folder / "mine.png").startswith("sks, dog, ")
    app.concept.value = 2
    assert app.run() is None and "1 concept" in app.status.value


def test_caption_step_reports_a_missing_folder(tmp_path):

    config = DreamBoothConfig(concepts_list=[Concept(instance_data_dir=str(tmp_path / "no"))])
    app = CaptionApp(config, model="tiny")
    assert app.run() is None
    assert "does not exist" in app.status.value and not app.run_button.disabled


def test_wd14_hub_id_goes_through_timm_and_the_tags_file(monkeypatch, tiny_tagger):
    """The real tagger's path with timm and the Hub stood in for (neither is reachable here):
    ``hf-hub:ID`` to timm, ``selected_tags.csv`` from the Hub, then the same tag rules."""
    import sys
    import types

    import huggingface_hub

    from colab_dreambooth.data.captioners import _load_tiny_tagger, tiny_tagger_path

    folder, calls = tiny_tagger_path(), []
    timm = types.ModuleType("timm")
    timm.create_model = lambda name, pretrained=False: (calls.append((name, pretrained))
                                                        or _load_tiny_tagger(folder))
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, filename, **kw: (
        calls.append((repo, filename)) or str(folder / filename)))
    tagger = load_captioner("SmilingWolf/wd-vit-tagger-v3")
    assert tagger.kind == TAGS
    assert calls == [("hf-hub:SmilingWolf/wd-vit-tagger-v3", True),
                     ("SmilingWolf/wd-vit-tagger-v3", "selected_tags.csv")]
    image = Image.new("RGB", (30, 20), (200, 100, 50))
    assert tagger.caption([image]) == tiny_tagger.caption([image])

    monkeypatch.setitem(sys.modules, "timm", None)  # not installed
    with pytest.raises(ModelLoadError, match="pip install timm"):
        load_captioner("SmilingWolf/wd-vit-tagger-v3")


def test_a_gated_model_is_loaded_again_with_the_hub_token(monkeypatch):
    from colab_dreambooth.data.captioners import _from_hub
    from colab_dreambooth.runtime.hub_token import forget_session_token

    forget_session_token()
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    calls = []

    def load(source, **kwargs):
        calls.append(kwargs)
        if not kwargs:
            raise OSError("401 Client Error: Unauthorized for url")
        return "loaded"

    assert _from_hub(load, "owner/gated") == "loaded"
    assert calls == [{}, {"token": "hf_secret"}]
    with pytest.raises(OSError, match="404"):  # other failures are not retried
        _from_hub(lambda source, **kw: (_ for _ in ()).throw(OSError("404 not found")), "o/x")


def test_current_captions_are_shown_to_edit_without_a_model(tmp_path):
    from colab_dreambooth.data.captioning import MISSING, current_captions

    folder = make_folder(tmp_path / "images")
    before = digests(folder)
    report = current_captions(folder)
    assert [r.status for r in report.rows].count(MISSING) == 6  # broken.jpg too: no model
    assert {r.image.name: r.caption for r in report.of(KEPT)} == {
        "mine.png": "my own caption of sks dog", "windows.png": "an upper-case caption"}
    assert digests(folder) == before

    config = DreamBoothConfig(concepts_list=[Concept(instance_data_dir=str(folder))])
    app = CaptionApp(config, model="no/such-model")  # never loaded here
    assert app.show_current() is not None and "6 without a caption" in app.status.value
    names = [r.image.name for r in app.rows]
    app.editors[names.index("holiday.jpg")].value = "typed by hand"
    assert app.save() == [folder / "holiday.txt"]
    assert read_caption(folder / "holiday.jpg") == "typed by hand"
