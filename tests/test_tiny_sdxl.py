"""The tiny SDXL-shaped model (issue 15's offline stand-in): SDXL's topology at tiny widths,
built offline and the same everywhere, loaded and run by diffusers' own SDXL pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from colab_dreambooth.models.tiny import build_tiny_sdxl_model, tiny_sdxl_model_path


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_it_has_sdxls_topology(pipe):
    unet = pipe.unet.config
    assert json.loads((tiny_sdxl_model_path() / "model_index.json").read_text())[
        "_class_name"] == "StableDiffusionXLPipeline"
    assert list(unet.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D",
                                           "CrossAttnDownBlock2D"]
    assert list(unet.transformer_layers_per_block) == [1, 1, 2]  # deeper blocks, more layers
    assert unet.use_linear_projection and unet.addition_embed_type == "text_time"
    # Cross-attention reads both encoders' hidden states side by side; the "text_time" extras
    # are the second encoder's pooled projection and six size/crop numbers.
    te, te2 = pipe.text_encoder.config, pipe.text_encoder_2.config
    assert unet.cross_attention_dim == te.hidden_size + te2.hidden_size
    assert unet.projection_class_embeddings_input_dim == (
        te2.projection_dim + 6 * unet.addition_time_embed_dim)
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast


def test_its_tokenizers_are_clips(pipe):
    ids = pipe.tokenizer("a photo of sks dog").input_ids
    assert len(pipe.tokenizer) == 49408 and ids[0] == 49406 and ids[-1] == 49407
    assert pipe.tokenizer_2("a photo of sks dog").input_ids == ids
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"


def test_diffusers_sdxl_pipeline_runs_it(pipe):
    image = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and float(image.std()) > 0


def test_it_is_built_the_same_everywhere(tmp_path):
    first, second = build_tiny_sdxl_model(tmp_path / "a"), build_tiny_sdxl_model(tmp_path / "b")
    for part in ("unet", "text_encoder_2", "vae"):
        files = sorted(p.relative_to(first) for p in (first / part).glob("*.safetensors"))
        assert files and all((first / f).read_bytes() == (second / f).read_bytes()
                             for f in files)
