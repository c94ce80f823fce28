"""The tiny Stable-Diffusion-shaped models for tests and demos, built offline.

They keep SD 1.x's and SDXL's exact topologies with tiny widths and random weights (seeded, so
they are the same everywhere), and real CLIP tokenizers built offline from the BPE merges
shipped in the ``open-clip-torch`` wheel.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path

from colab_dreambooth.errors import ModelLoadError
from colab_dreambooth.files import cached_folder

TINY_VERSION = "1"
TINY_SDXL_VERSION = "1"


def tiny_model_path() -> Path:
    """The tiny model's diffusers folder in the user cache, built on first use (~2 s)."""
    return cached_folder(f"tiny-sd-v{TINY_VERSION}", "model_index.json", build_tiny_model)


def build_tiny_model(folder: str | os.PathLike) -> Path:
    """Write a tiny Stable Diffusion 1.x-shaped pipeline (random, seeded weights) to ``folder``."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    tokenizer = clip_tokenizer()
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 num_train_timesteps=1000)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 32, 64, 64), norm_num_groups=16, cross_attention_dim=32,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(16, 16, 32, 32), norm_num_groups=16, sample_size=64,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
            vocab_size=len(tokenizer), max_position_embeddings=77, projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(**betas, skip_prk_steps=True, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def tiny_sdxl_model_path() -> Path:
    """The tiny SDXL model's diffusers folder in the user cache, built on first use."""
    return cached_folder(f"tiny-sdxl-v{TINY_SDXL_VERSION}", "model_index.json",
                         build_tiny_sdxl_model)


def build_tiny_sdxl_model(folder: str | os.PathLike) -> Path:
    """Write a tiny Stable Diffusion XL-shaped pipeline (random, seeded weights) to ``folder``.

    SDXL's topology at tiny widths: a UNet of three blocks (the first without attention, more
    transformer layers deeper down, linear projections) conditioned on both text encoders'
    hidden states side by side and on "text_time" extras (the second encoder's pooled,
    projected output and six size/crop numbers); CLIP-L-shaped ``text_encoder`` and
    OpenCLIP-bigG-shaped ``text_encoder_2`` (with projection, its tokenizer padding with "!"
    as SDXL's does); SDXL's VAE scaling factor 0.13025.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    tokenizer = clip_tokenizer()
    tokenizer_2 = clip_tokenizer(pad_token="!")
    hidden, hidden_2, projection, time_dim = 32, 32, 32, 8
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 64, 64), norm_num_groups=16, attention_head_dim=(2, 4, 8),
            transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
            cross_attention_dim=hidden + hidden_2, addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=projection + 6 * time_dim,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(16, 16, 32, 32), norm_num_groups=16, sample_size=64,
            scaling_factor=0.13025, force_upcast=True,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        common = dict(intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                      vocab_size=len(tokenizer), max_position_embeddings=77,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            hidden_size=hidden, projection_dim=projection, hidden_act="quick_gelu",
            pad_token_id=tokenizer.pad_token_id, **common))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=hidden_2, projection_dim=projection, hidden_act="gelu",
            pad_token_id=tokenizer_2.pad_token_id, **common))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", num_train_timesteps=1000,
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder)
    return folder


@lru_cache(maxsize=1)
def _clip_vocab_files() -> Path:
    """vocab.json + merges.txt of CLIP's BPE, made from open-clip-torch's merges file."""
    spec = importlib.util.find_spec("open_clip")  # find, not import: it would pull torchvision
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the tiny model needs CLIP's vocabulary from the open-clip-torch "
                             "package: pip install --no-deps open-clip-torch")
    merges_gz = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(merges_gz).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]

    def write(out: Path) -> None:
        (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}),
                                        encoding="utf-8")
        (out / "merges.txt").write_text(
            "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")

    return cached_folder("clip-bpe", "merges.txt", write)


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """Stable Diffusion's CLIP tokenizer (49,408 tokens, 77 positions), built offline;
    ``pad_token="!"`` gives SDXL's second tokenizer."""
    from transformers import CLIPTokenizer

    files = _clip_vocab_files()
    return CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"),
                         model_max_length=77, pad_token=pad_token)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP's reversible byte -> printable character table.
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))
