"""Tests for colab_dreambooth.config.prompts: captions, [filewords] and Existing Prompt Contents."""

from __future__ import annotations

import pytest

from colab_dreambooth.config.prompts import (
    EXISTING_PROMPT_CONTENTS,
    PromptError,
    build_prompts,
    contains_token,
    split_class_tokens,
)

DESC, INST_DESC, CLASS_DESC, INST_CLASS_DESC = EXISTING_PROMPT_CONTENTS


def build(caption, mode, *, instance="[filewords]", klass="[filewords]", token="sks",
          classes="a woman, woman", **kw):
    return build_prompts(caption, instance, klass, token, classes, mode, **kw)


def test_modes_are_the_extension_display_strings():
    assert EXISTING_PROMPT_CONTENTS == (
        "Description",
        "Instance Token + Description",
        "Class Token + Description",
        "Instance Token + Class Token + Description",
    )


# --- the example given to users in fields.md -------------------------------------------------

@pytest.mark.parametrize("mode", [DESC, CLASS_DESC])
@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a photo of a woman", "a photo of sks woman"),
        ("a photo of a man and a woman", "a photo of a man and sks woman"),
    ],
)
def test_fields_md_example(mode, caption, expected):
    assert build(caption, mode) == (expected, caption)


# --- each mode on several captions ------------------------------------------------------------

@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a woman", "sks woman"),
        ("woman standing on a beach", "sks woman standing on a beach"),
        ("portrait of the woman, smiling", "portrait of sks woman, smiling"),
        ("an old photo of a woman and a woman", "an old photo of sks woman and a woman"),
    ],
)
def test_description(caption, expected):
    assert build(caption, DESC) == (expected, caption)


def test_description_is_the_default_for_a_blank_mode():
    assert build("a photo of a woman", "") == ("a photo of sks woman", "a photo of a woman")
    assert build("a photo of a woman", "  ") == ("a photo of sks woman", "a photo of a woman")


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a photo of sks", ("a photo of sks woman", "a photo of woman")),
        ("sks smiling at the camera", ("sks woman smiling at the camera",
                                       "woman smiling at the camera")),
        ("a photo of sks woman", ("a photo of sks woman", "a photo of woman")),
        ("close-up of SKS, outdoors", ("close-up of SKS woman, outdoors",
                                       "close-up of woman, outdoors")),
    ],
)
def test_instance_token_plus_description(caption, expected):
    assert build(caption, INST_DESC) == expected


def test_instance_token_plus_description_uses_first_listed_class_word():
    assert build("sks on a bike", INST_DESC, classes="man, a guy") == (
        "sks man on a bike", "man on a bike")


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a photo of a woman in a red dress", "a photo of sks woman in a red dress"),
        ("woman, portrait, studio light", "sks woman, portrait, studio light"),
    ],
)
def test_class_token_plus_description(caption, expected):
    assert build(caption, CLASS_DESC) == (expected, caption)


def test_class_token_plus_description_drops_the_article_before_a_bare_class_token():
    assert build("a photo of a woman", CLASS_DESC, classes="woman") == (
        "a photo of sks woman", "a photo of a woman")


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a photo of sks woman", ("a photo of sks woman", "a photo of woman")),
        ("sks, a woman, at the beach", ("sks, a woman, at the beach", "a woman, at the beach")),
        ("a woman, sks, smiling", ("a woman, sks, smiling", "a woman, smiling")),
    ],
)
def test_instance_token_plus_class_token_plus_description(caption, expected):
    assert build(caption, INST_CLASS_DESC) == expected


def test_mode_is_matched_ignoring_case_and_spacing():
    assert build("a photo of sks", "instance token  +  description") == (
        "a photo of sks woman", "a photo of woman")


# --- class tokens: longest first, case, whole words, specials ---------------------------------

def test_split_class_tokens_longest_first_without_blanks_or_duplicates():
    assert split_class_tokens("woman, a woman, , Woman,  young   woman ") == [
        "young woman", "a woman", "woman"]
    assert split_class_tokens("") == []


def test_longest_class_token_wins():
    assert build("a photo of a woman", DESC, classes="woman, a woman") == (
        "a photo of sks woman", "a photo of a woman")
    assert build("a photo of a young woman", DESC, classes="woman, young woman")[0] == (
        "a photo of sks young woman")
    assert build("a photo of a young woman", DESC, classes="woman")[0] == (
        "a photo of a young sks woman")


def test_matching_is_case_insensitive():
    assert build("A Photo of A Woman", DESC)[0] == "A Photo of sks Woman"
    assert build("a photo of SKS", INST_CLASS_DESC, classes="")[1] == "a photo of"
    assert contains_token("Photo of SKS woman", "sks")


def test_matching_is_whole_word():
    assert not contains_token("she asks a question", "sks")
    assert not contains_token("sks_woman", "sks")
    assert contains_token("sks, woman", "sks")
    assert not contains_token("anything", "")
    # "asks" holds "sks" and "womanly" holds "woman", but neither is the whole word.
    assert build("a womanly woman who asks", DESC) == (
        "a womanly sks woman who asks", "a womanly woman who asks")
    assert build("sks asks a woman", INST_CLASS_DESC) == ("sks asks a woman", "asks a woman")


def test_tokens_with_spaces_and_regex_specials():
    assert contains_token("learn c++ now", "c++")
    assert contains_token("a  young\nwoman", "young woman")
    assert build("a photo of a (wo)man", DESC, token="<sks>", classes="(wo)man") == (
        "a photo of <sks> (wo)man", "a photo of a (wo)man")


# --- tidying and templates --------------------------------------------------------------------

def test_tidying_after_a_rewrite():
    assert build("sks , , woman ,portrait,", INST_CLASS_DESC) == (
        "sks, woman,portrait", "woman,portrait")
    assert build("  a photo of   a woman  ", DESC) == ("a photo of sks woman", "a photo of a woman")


def test_without_filewords_prompts_are_returned_as_written():
    assert build("ignored caption", DESC, instance="  photo of  ohwx man ,, smiling ,",
                 klass="photo of a man ", token="sks", classes="woman") == (
        "photo of ohwx man, smiling", "photo of a man")


def test_template_text_around_filewords_is_kept():
    assert build("a woman at the beach", DESC, instance="photo of sks woman, [filewords]",
                 klass="photo of a woman, [filewords]") == (
        "photo of sks woman, a woman at the beach", "photo of a woman, a woman at the beach")
    assert build("a photo of a woman", DESC, instance="[filewords], best quality") == (
        "a photo of sks woman, best quality", "a photo of a woman")


def test_blank_class_prompt_means_no_prior_preservation():
    assert build("a photo of a woman", DESC, klass="") == ("a photo of sks woman", "")
    assert build("a photo of sks woman", DESC, klass="   ") == ("a photo of sks woman", "")


def test_instance_side_only_with_blank_token_in_last_mode():
    assert build("a photo of a woman", INST_CLASS_DESC, token="", klass="") == (
        "a photo of a woman", "")


# --- errors -----------------------------------------------------------------------------------

def test_description_caption_without_class_token_names_the_file(tmp_path):
    caption_file = tmp_path / "img_001.txt"
    with pytest.raises(PromptError) as err:
        build("a photo of a man", DESC, caption_file=caption_file, concept="alice")
    message = str(err.value)
    assert "concept 'alice'" in message
    assert str(caption_file) in message
    assert "Add the class word to the caption" in message
    assert "Existing Prompt Contents" in message
    assert err.value.caption_file == caption_file


def test_blank_class_token_in_description_mode_says_to_set_it():
    with pytest.raises(PromptError, match="set the Class Token"):
        build("a photo of a woman", DESC, classes="", caption_file="a.txt")


def test_caption_with_instance_token_in_description_mode_breaks_the_class_rule():
    with pytest.raises(PromptError) as err:
        build("a photo of sks woman", DESC, caption_file="photos/sks_01.txt", concept="c1")
    message = str(err.value)
    assert "photos/sks_01.txt" in message and "concept 'c1'" in message
    assert "holds the Instance Token 'sks'" in message
    assert "'Instance Token'" in message


def test_class_prompt_written_with_the_instance_token_is_an_error():
    with pytest.raises(PromptError, match="remove it from the class prompt"):
        build("x", DESC, instance="sks woman", klass="photo of sks woman")


def test_instance_token_missing_from_caption_in_instance_token_mode():
    with pytest.raises(PromptError) as err:
        build("a photo of a woman", INST_DESC, caption_file="b.txt")
    assert "b.txt" in str(err.value)
    assert "lacks the Instance Token 'sks'" in str(err.value)


def test_class_word_missing_from_caption_in_last_mode():
    with pytest.raises(PromptError) as err:
        build("a photo of sks", INST_CLASS_DESC, caption_file="c.txt")
    assert "c.txt" in str(err.value)
    assert "lacks a class word (woman)" in str(err.value)


def test_blank_instance_token_with_filewords_says_to_set_it():
    for mode in (DESC, INST_DESC, CLASS_DESC):
        with pytest.raises(PromptError, match="set the Instance Token"):
            build("a photo of a woman", mode, token="")
    with pytest.raises(PromptError, match="set the Instance Token"):
        build("a photo of a woman", INST_CLASS_DESC, token="")


def test_unknown_mode_lists_the_valid_ones():
    with pytest.raises(PromptError) as err:
        build("a photo of a woman", "Captions", concept="alice")
    message = str(err.value)
    assert "concept 'alice'" in message and "'Captions'" in message
    for mode in EXISTING_PROMPT_CONTENTS:
        assert f"'{mode}'" in message


def test_prompt_error_is_a_value_error():
    assert issubclass(PromptError, ValueError)
    assert str(PromptError("boom")) == "boom"
