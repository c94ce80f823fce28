"""Tests for colab_dreambooth.data.captions: an image's caption from its .txt or its file name."""

from __future__ import annotations

import pytest
from PIL import Image

from colab_dreambooth.config.prompts import EXISTING_PROMPT_CONTENTS, PromptError, build_prompts
from colab_dreambooth.data.captions import (
    caption_from_filename,
    folder_captions,
    image_caption,
    read_caption,
)

DESC = EXISTING_PROMPT_CONTENTS[0]


def build(caption, mode, *, instance="[filewords]", klass="[filewords]", token="sks",
          classes="a woman, woman", **kw):
    return build_prompts(caption, instance, klass, token, classes, mode, **kw)


# --- captions from files ----------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, expected",
    [
        ("00012-1234-a photo of x.png", "a photo of x"),
        ("woman_003.jpg", "woman"),
        ("woman (2).jpg", "woman"),
        ("woman-12.png", "woman"),
        ("a_photo_of_a_woman_007 (3).jpeg", "a photo of a woman"),
        ("IMG_1234.JPG", "IMG"),
        ("0001.png", ""),
        ("3 dogs playing.webp", "3 dogs playing"),
        ("portrait__of   sks.png", "portrait of sks"),
    ],
)
def test_caption_from_filename(tmp_path, name, expected):
    image = tmp_path / name
    image.write_bytes(b"")
    assert caption_from_filename(image) == expected
    assert read_caption(image) == expected


def test_read_caption_prefers_the_txt_with_bom_and_windows_newlines(tmp_path):
    image = tmp_path / "woman_003.png"
    image.write_bytes(b"")
    image.with_suffix(".txt").write_bytes(
        "\ufeffa photo of a woman,\r\n  smiling\r\n\r\nin Zürich\r\n".encode("utf-8"))
    assert read_caption(image) == "a photo of a woman, smiling in Zürich"


def test_read_caption_empty_txt_falls_back_to_the_file_name(tmp_path):
    image = tmp_path / "a_photo_of_a_woman_02.jpg"
    image.write_bytes(b"")
    image.with_suffix(".txt").write_text(" \n", encoding="utf-8")
    assert read_caption(image) == "a photo of a woman"


def test_read_caption_invalid_utf8_names_the_file(tmp_path):
    image = tmp_path / "woman_01.png"
    image.write_bytes(b"")
    caption_file = image.with_suffix(".txt")
    caption_file.write_bytes("une photo d'une femme âgée".encode("latin-1"))
    with pytest.raises(PromptError) as err:
        read_caption(image, concept="alice")
    message = str(err.value)
    assert str(caption_file) in message and "concept 'alice'" in message
    assert "save it with UTF-8 encoding" in message


def test_caption_file_feeds_build_prompts(tmp_path):
    image = tmp_path / "00003-42-ignored.png"
    image.write_bytes(b"")
    image.with_suffix(".txt").write_text("a photo of a man and a woman\n", encoding="utf-8")
    assert build(read_caption(image), DESC) == (
        "a photo of a man and sks woman", "a photo of a man and a woman")


def test_image_caption_names_the_file_it_came_from(tmp_path):
    image = tmp_path / "a_woman.png"
    image.write_bytes(b"")
    assert image_caption(image).source == image  # the file name gave the caption
    image.with_suffix(".TXT").write_text("a photo of a woman", encoding="utf-8")
    caption = image_caption(image)
    assert (caption.text, caption.source) == ("a photo of a woman", image.with_suffix(".TXT"))


def test_folder_captions_reads_the_usable_images_in_order(tmp_path):
    for name in ("b_woman.png", "a_man.png"):
        Image.new("RGB", (64, 64), "white").save(tmp_path / name)
    (tmp_path / "b_woman.txt").write_text("a photo of a woman\n", encoding="utf-8")
    (tmp_path / "tiny.png").write_bytes(b"not an image")
    captions = folder_captions(tmp_path, 64)
    assert [(c.text, c.source.name) for c in captions] == [
        ("a man", "a_man.png"), ("a photo of a woman", "b_woman.txt")]
    assert folder_captions(tmp_path / "missing", 64) == []
