"""Long prompts in 75-token chunks, clip skip, caption tag shuffling, frozen CLIP norm."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from colab_dreambooth.config.prompts import shuffle_tags
from colab_dreambooth.errors import ConfigError
from colab_dreambooth.models.loading import load_components
from colab_dreambooth.models.text_encoding import chunked_input_ids, encode_prompts, num_text_layers
from colab_dreambooth.models.tiny import tiny_model_path
from colab_dreambooth.training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = ", ".join(f"tag{i}" for i in range(40))  # 75-150 tokens


@pytest.fixture(scope="module")
def parts():
    return load_components("tiny")


def _body(parts, prompt):
    return parts.tokenizer([prompt], add_special_tokens=False).input_ids[0]


@pytest.mark.parametrize("pad", [True, False])
def test_one_chunk_is_what_the_tokenizer_gives(parts, pad):
    prompts = ["a photo of zwx toy", "toy", LONG]
    expected = parts.tokenizer(prompts, padding="max_length" if pad else "longest",
                               truncation=True, max_length=77, return_tensors="pt").input_ids
    ids = chunked_input_ids(parts.tokenizer, prompts[:2], pad_tokens=pad)
    short = parts.tokenizer(prompts[:2], padding="max_length" if pad else "longest",
                            truncation=True, max_length=77, return_tensors="pt").input_ids
    assert ids.shape[1] == 1 and torch.equal(ids[:, 0], short)
    assert torch.equal(chunked_input_ids(parts.tokenizer, prompts, pad_tokens=pad)[:, 0],
                       expected)


def test_a_150_token_prompt_gives_two_chunks_and_its_own_embedding(parts):
    body = _body(parts, LONG)
    assert 75 < len(body) <= 150
    ids = chunked_input_ids(parts.tokenizer, [LONG], max_token_length=150)
    tok = parts.tokenizer
    assert ids.shape == (1, 2, 77)
    for chunk, part in zip(ids[0], (body[:75], body[75:])):
        assert chunk[0] == tok.bos_token_id and chunk[len(part) + 1] == tok.eos_token_id
        assert chunk[1:len(part) + 1].tolist() == part
    with torch.no_grad():
        long = encode_prompts(tok, parts.text_encoder, [LONG], max_token_length=150)
        cut = encode_prompts(tok, parts.text_encoder, [LONG])
        # the same first 75 tokens, the tail dropped: padded to the same 2 chunks
        cut_ids = tok.decode(body[:75])
        cut2 = encode_prompts(tok, parts.text_encoder, [cut_ids], max_token_length=150)
    assert long.shape == (1, 1 + 150 + 1, 32) and cut.shape == (1, 77, 32)
    # causal attention: the first chunk's states are the truncated prompt's
    assert torch.allclose(long[:, :76], cut[:, :76], atol=1e-6)
    assert not torch.allclose(long[:, 76:151], cut2[:, 76:151], atol=1e-3)  # the tail counts


def test_without_pad_tokens_only_the_chunks_needed(parts):
    ids = chunked_input_ids(parts.tokenizer, ["short", LONG], max_token_length=225,
                            pad_tokens=False)
    assert ids.shape == (2, 2, 77)  # the longest prompt needs 2 of the 3 allowed chunks
    assert chunked_input_ids(parts.tokenizer, ["short"], max_token_length=225,
                             pad_tokens=True).shape == (1, 3, 77)


def test_clip_skip_2_is_the_penultimate_layer_through_the_final_norm(parts):
    te = parts.text_encoder
    ids = chunked_input_ids(parts.tokenizer, ["a photo of zwx toy"])[:, 0]
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
        skip1 = encode_prompts(parts.tokenizer, te, ["a photo of zwx toy"], clip_skip=1)
        skip2 = encode_prompts(parts.tokenizer, te, ["a photo of zwx toy"], clip_skip=2)
        norm = getattr(te, "text_model", te).final_layer_norm
        assert torch.equal(skip1, out.last_hidden_state)
        assert torch.allclose(skip2, norm(out.hidden_states[-2]), atol=1e-6)
    assert not torch.allclose(skip1, skip2)
    assert num_text_layers(te) == 2


def test_clip_skip_beyond_the_layers_is_an_error(tiny_config):
    with pytest.raises(ConfigError, match="clip_skip"):
        train(tiny_config.copy(clip_skip=3), progress=False)


def test_shuffle_keeps_the_first_tags_and_is_a_pure_function():
    caption = "zwx toy, red, small, shiny, on a table, studio light, wooden"
    tags = [t.strip() for t in caption.split(",")]
    orders = set()
    for epoch in range(6):
        out = shuffle_tags(caption, 2, seed=7, epoch=epoch, index=3)
        assert out == shuffle_tags(caption, 2, seed=7, epoch=epoch, index=3)  # no hidden state
        got = out.split(", ")
        assert got[:2] == tags[:2] and sorted(got) == sorted(tags)
        orders.add(out)
    assert len(orders) > 1  # a new order each epoch
    assert shuffle_tags(caption, 2, 7, 0, 3) != shuffle_tags(caption, 2, 7, 0, 4) or \
        shuffle_tags(caption, 2, 7, 1, 3) != shuffle_tags(caption, 2, 7, 1, 4)
    assert shuffle_tags("no commas here", 1, 0, 0, 0) == "no commas here"
    zero = {shuffle_tags(caption, 0, 7, e, 0).split(", ")[0] for e in range(10)}
    assert len(zero) > 1  # keep 0: even the first tag moves


def _text_encoder_weights(folder):
    return load_file(next((folder / "text_encoder").glob("*.safetensors")))


def test_freeze_clip_normalization_keeps_the_final_norm(tiny_config):
    base = _text_encoder_weights(tiny_model_path())
    result = train(tiny_config.copy(max_train_steps=2, freeze_clip_normalization=True),
                   progress=False)
    trained = _text_encoder_weights(result.model_dir)
    norm = [k for k in base if "final_layer_norm" in k]
    assert len(norm) == 2
    assert all(torch.equal(base[k], trained[k]) for k in norm)
    assert any(not torch.equal(base[k], trained[k]) for k in base if k not in norm)


def test_long_prompts_and_clip_skip_act_in_training(tiny_config):
    base = tiny_config.copy(max_train_steps=2, train_text_encoder=False)
    default = train(base.copy(model_name="d"), progress=False).losses
    long = train(base.copy(model_name="l", max_token_length=150), progress=False).losses
    skip = train(base.copy(model_name="s", clip_skip=2), progress=False).losses
    assert long != default and skip != default


def test_lora_metadata_records_the_text_options(parts, tiny_config):
    from colab_dreambooth.models.lora import lora_metadata

    config = tiny_config.copy(clip_skip=2, max_token_length=150, shuffle_tags=True,
                              keep_tokens=2, offset_noise=0.1, optimizer="Lion")
    meta = lora_metadata(config, parts.unet, steps=1, epochs=1, seed=0,
                         instance_prompts=["zwx toy"], prediction_type="epsilon")
    assert (meta["ss_clip_skip"], meta["ss_max_token_length"], meta["ss_keep_tokens"],
            meta["ss_shuffle_caption"], meta["ss_optimizer"]) == ("2", "150", "2", "True", "Lion")
    assert float(meta["ss_noise_offset"]) == 0.1


def test_the_dataset_shuffles_tags_per_seed_epoch_and_index(demo_root):
    from colab_dreambooth.data.dataset import DreamBoothDataset, Example, TrainingData

    images = sorted((demo_root / "data" / "instance").glob("*.png"))
    classes = sorted((demo_root / "data" / "class").glob("*.png"))
    prompt = "zwx toy, red, shiny, small, on a table, studio light"
    data = TrainingData([Example(p, prompt, 0) for p in images],
                        {0: [Example(p, "toy, red, small, wooden", 0) for p in classes]})

    def prompts(dataset, epoch):
        dataset.set_epoch(epoch)
        return [(dataset[i]["instance"][1], dataset[i]["class"][1]) for i in range(len(images))]

    plain = DreamBoothDataset(data, 64, False, True, seed=3)
    assert all(p == (prompt, "toy, red, small, wooden") for p in prompts(plain, 0))
    a = DreamBoothDataset(data, 64, False, True, seed=3, shuffle_tags=True, keep_tokens=1)
    b = DreamBoothDataset(data, 64, False, True, seed=3, shuffle_tags=True, keep_tokens=1)
    epoch0, epoch1 = prompts(a, 0), prompts(a, 1)
    assert prompts(b, 1) == epoch1 and prompts(b, 0) == epoch0  # any order of calls
    assert epoch0 != epoch1
    for instance, klass in epoch0 + epoch1:
        assert instance.startswith("zwx toy, ") and klass.startswith("toy, ")
        assert sorted(instance.split(", ")) == sorted(prompt.split(", "))


def test_samples_encode_prompts_as_training_does(parts):
    """Previews and samples condition on the layer and chunks training used."""
    from diffusers import StableDiffusionPipeline

    from colab_dreambooth.generation.sample import generate_samples

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path(), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    original = pipe.unet.forward

    def spy(sample, timestep, encoder_hidden_states, *args, **kwargs):
        seen.append(encoder_hidden_states)
        return original(sample, timestep, encoder_hidden_states, *args, **kwargs)

    pipe.unet.forward = spy

    def states(**options):
        seen.clear()
        generate_samples(pipe, LONG, seed=1, steps=1, height=64, width=64, progress=False,
                         **options)
        return seen[0]  # (negative, positive) batch of the first step

    plain, skip2, long = states(), states(clip_skip=2), states(max_token_length=150)
    with torch.no_grad():
        expected = encode_prompts(pipe.tokenizer, pipe.text_encoder, [LONG], clip_skip=2)
    assert torch.allclose(skip2[1:], expected, atol=1e-5)
    assert torch.allclose(plain[1:], encode_prompts(pipe.tokenizer, pipe.text_encoder, [LONG]),
                          atol=1e-5)
    assert long.shape == (2, 152, 32) and plain.shape == (2, 77, 32)


def test_text_encoder_stops_after_its_fraction_of_the_steps(tiny_config):
    """Step Ratio 0.5 of 4 steps: the text encoder ends as after 2 steps of training."""
    half = train(tiny_config.copy(model_name="half", max_train_steps=4, stop_text_encoder=0.5),
                 progress=False)
    two = train(tiny_config.copy(model_name="two", max_train_steps=2), progress=False)
    a, b = _text_encoder_weights(half.model_dir), _text_encoder_weights(two.model_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in
               _text_encoder_weights(tiny_model_path()).items())
