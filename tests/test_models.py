"""Loading base models: the tiny model, local folders, single files and Hub ids."""

from __future__ import annotations

import shutil

import pytest

from colab_dreambooth.errors import ModelLoadError
from colab_dreambooth.models.loading import load_components, resolve_model_folder
from colab_dreambooth.models.tiny import clip_tokenizer, tiny_model_path


def test_tiny_model_has_stable_diffusion_topology():
    parts = load_components("tiny")
    unet, vae = parts.unet.config, parts.vae.config
    assert tuple(unet.down_block_types) == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert tuple(unet.up_block_types) == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert unet.in_channels == 4 and unet.layers_per_block == 2
    assert unet.cross_attention_dim == parts.text_encoder.config.hidden_size
    assert len(vae.block_out_channels) == 4 and vae.latent_channels == 4
    assert parts.prediction_type == "epsilon"
    assert parts.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert type(parts.inference_scheduler).__name__ == "PNDMScheduler"


def test_tiny_model_is_the_same_every_time(tmp_path):
    from safetensors.torch import load_file

    from colab_dreambooth.models.tiny import build_tiny_model

    build_tiny_model(tmp_path / "again")
    a = load_file(next((tiny_model_path() / "unet").glob("*.safetensors")))
    b = load_file(next((tmp_path / "again" / "unet").glob("*.safetensors")))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_clip_tokenizer_matches_stable_diffusion():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    # Known ids of SD's tokenizer: <|startoftext|> a photo of ... <|endoftext|>
    assert tok("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert tok.model_max_length == 77
    assert tok.pad_token == "<|endoftext|>"


def test_local_diffusers_folder_loads(tmp_path):
    folder = tmp_path / "my model"
    shutil.copytree(tiny_model_path(), folder)
    assert resolve_model_folder(str(folder)) == folder
    parts = load_components(str(folder))
    assert parts.source == str(folder)


def test_incomplete_folder_is_a_clear_error(tmp_path):
    folder = tmp_path / "half"
    shutil.copytree(tiny_model_path(), folder)
    shutil.rmtree(folder / "unet")
    with pytest.raises(ModelLoadError, match="not a complete Stable Diffusion diffusers folder"):
        load_components(str(folder))


def test_missing_single_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_components(str(tmp_path / "model.safetensors"))


def test_hub_id_without_network_says_what_to_do(monkeypatch, tmp_path):
    # The Hub cannot be reached here; offline mode makes the real code path fail at once.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as err:
        load_components("someone/some-sd-model")
    message = str(err.value)
    assert "someone/some-sd-model" in message and "Hugging Face Hub" in message
    assert "tiny" in message  # offers the offline way to try the package
