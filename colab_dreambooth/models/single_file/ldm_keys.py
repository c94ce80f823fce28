"""Weight names of the original single-file (LDM/CompVis) layout and their diffusers twins.

A single-file Stable Diffusion checkpoint (what AUTOMATIC1111, ComfyUI and Civitai use) keeps
every weight in one flat dict:

- UNet under ``model.diffusion_model.`` (``input_blocks``/``middle_block``/``output_blocks``);
- VAE under ``first_stage_model.`` (``encoder.down.N.block.M``, 1x1-conv attention);
- text encoder under ``cond_stage_model.transformer.text_model.`` (SD 1.x, CLIP ViT-L in the
  Hugging Face layout) or ``cond_stage_model.model.`` (SD 2.x, OpenCLIP ViT-H with fused
  ``in_proj`` attention and 24 blocks of which diffusers keeps the first 23).

Stable Diffusion XL (base 1.0 and its fine-tunes) keeps the same UNet and VAE prefixes (its
UNet: three levels, none with attention at the top, more transformer layers deeper down, and
the size/pooled-text embedding ``label_emb.0``) and two text encoders:

- ``conditioner.embedders.0.transformer.text_model.``: CLIP ViT-L in the Hugging Face layout;
- ``conditioner.embedders.1.model.``: OpenCLIP ViT-bigG in OpenCLIP's layout, all 32 blocks
  kept, with ``text_projection`` stored as the matrix text features are multiplied by (the
  transpose of diffusers' ``text_projection.weight``).

Everything here is pure naming: :class:`KeyLink` says which diffusers weight(s) make which
original weight, for a given model topology. Import and export both walk the same links, so
the two directions cannot drift apart. No tensors are read here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from colab_dreambooth.errors import UserError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
# Some SD 1.x files (old transformers) lack the ``text_model.`` level.
CLIP_PREFIX_SHORT = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
# SDXL's two text encoders (see the module docs); an SDXL refiner has only the OpenCLIP one,
# as embedder 0.
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_OPEN_CLIP_PREFIX = "conditioner.embedders.0.model."
# The EMA copy of the UNet in LDM training checkpoints: dots removed after ``model.``.
EMA_PREFIX = "model_ema."

# Inside a UNet resnet: diffusers name -> LDM name.
_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
                ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
             # SDXL: the embedding of the pooled text features and the size/crop numbers.
             "add_embedding.linear_1.": "label_emb.0.0.",
             "add_embedding.linear_2.": "label_emb.0.2."}
# Inside the VAE's mid-block attention: diffusers name -> LDM name (LDM uses 1x1 convs).
_VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.",
                  "to_out.0.": "proj_out."}


@dataclass(frozen=True)
class KeyLink:
    """One weight of the original layout and the diffusers weight(s) it is made of.

    ``diffusers`` holds one name, or three (query, key, value) that OpenCLIP stores fused along
    the first dimension as ``in_proj_weight``/``in_proj_bias``. ``conv1x1`` marks a diffusers
    linear weight that the original layout stores as a 1x1 convolution (VAE attention);
    ``transpose`` one that it stores transposed (OpenCLIP's ``text_projection`` matrix).
    """

    diffusers: tuple[str, ...]
    ldm: str
    conv1x1: bool = False
    transpose: bool = False

    @property
    def fused(self) -> bool:
        """Whether the original weight is the concatenation of several diffusers weights."""
        return len(self.diffusers) > 1


class UnmappedKeyError(UserError, ValueError):
    """A diffusers weight that has no place in the original layout (an unsupported model)."""


# ----------------------------------------------------------------------------------- UNet
def unet_links(diffusers_keys: Iterable[str], config: Mapping) -> list[KeyLink]:
    """Links for a ``UNet2DConditionModel`` with SD's block layout, given its diffusers config.

    Works for any number of blocks, layers per block, transformer layers and widths (so
    SD-shaped tiny models map the same way as SD 1.x/2.x, and SDXL's UNet too); raises
    :class:`UnmappedKeyError` for parts SD does not have.
    """
    prefixes = _unet_prefixes(config)
    links = []
    for key in diffusers_keys:
        links.append(KeyLink((key,), UNET_PREFIX + _unet_ldm_name(key, prefixes)))
    return links


def _unet_prefixes(config: Mapping) -> list[tuple[str, str]]:
    """Block-level prefixes, diffusers -> LDM, longest first so that the right one wins."""
    n_blocks = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise UnmappedKeyError("a UNet with a different number of layers per block is not an "
                               "SD 1.x/2.x/XL UNet")
    up_attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    table = dict(_UNET_TOP)
    for i in range(n_blocks):
        for j in range(layers):
            n = (layers + 1) * i + j + 1
            table[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{n}.0."
            table[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{n}.1."
        if i < n_blocks - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(layers + 1) * (i + 1)}.0.op."
        for j in range(layers + 1):
            n = (layers + 1) * i + j
            table[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{n}.0."
            table[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{n}.1."
        if i < n_blocks - 1:
            # The upsampler follows the last layer's resnet (and its attention, if any).
            n = (layers + 1) * i + layers
            table[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{n}.{2 if up_attention[i] else 1}."
    table["mid_block.resnets.0."] = "middle_block.0."
    table["mid_block.attentions.0."] = "middle_block.1."
    table["mid_block.resnets.1."] = "middle_block.2."
    return sorted(table.items(), key=lambda item: -len(item[0]))


def _unet_ldm_name(key: str, prefixes: list[tuple[str, str]]) -> str:
    for hf, ldm in prefixes:
        if key.startswith(hf):
            rest = key[len(hf):]
            if ".resnets." in hf or hf.startswith("mid_block.resnets"):
                rest = _replace_first_part(rest, _UNET_RESNET)
            return ldm + rest
    raise UnmappedKeyError(f"UNet weight {key!r} has no place in the SD 1.x/2.x/XL layout")


def _replace_first_part(rest: str, table: Iterable[tuple[str, str]]) -> str:
    head, _, tail = rest.partition(".")
    for hf, ldm in table:
        if head == hf:
            return f"{ldm}.{tail}"
    return rest


# ------------------------------------------------------------------------------------ VAE
def vae_links(diffusers_keys: Iterable[str], config: Mapping) -> list[KeyLink]:
    """Links for an ``AutoencoderKL`` with SD's layout (any number of blocks and layers)."""
    n_blocks = len(config["block_out_channels"])
    links = []
    for key in diffusers_keys:
        ldm, conv = _vae_ldm_name(key, n_blocks)
        links.append(KeyLink((key,), VAE_PREFIX + ldm, conv1x1=conv))
    return links


def _vae_ldm_name(key: str, n_blocks: int) -> tuple[str, bool]:
    m = re.match(r"(encoder|decoder)\.(.*)", key)
    if not m:
        if re.match(r"(post_)?quant_conv\.", key):
            return key, False
        raise UnmappedKeyError(f"VAE weight {key!r} has no place in the SD layout")
    part, rest = m.groups()
    conv1x1 = False
    if (m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest)):
        rest = f"down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}"
    elif (m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.(.*)", rest)):
        rest = f"down.{m[1]}.downsample.{m[2]}"
    elif (m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest)):
        # diffusers counts decoder blocks from the bottom, LDM from the top.
        rest = f"up.{n_blocks - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}"
    elif (m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", rest)):
        rest = f"up.{n_blocks - 1 - int(m[1])}.upsample.{m[2]}"
    elif (m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest)):
        rest = f"mid.block_{int(m[1]) + 1}.{_vae_resnet(m[2])}"
    elif (m := re.match(r"mid_block\.attentions\.0\.(.*)", rest)):
        inner = m[1]
        for hf, ldm in _VAE_ATTENTION.items():
            if inner.startswith(hf):
                conv1x1 = hf != "group_norm." and inner.endswith("weight")
                inner = ldm + inner[len(hf):]
                break
        else:
            raise UnmappedKeyError(f"VAE weight {key!r} has no place in the SD layout")
        rest = f"mid.attn_1.{inner}"
    elif rest.startswith("conv_norm_out."):
        rest = "norm_out." + rest[len("conv_norm_out."):]
    elif not re.match(r"conv_(in|out)\.", rest):
        raise UnmappedKeyError(f"VAE weight {key!r} has no place in the SD layout")
    return f"{part}.{rest}", conv1x1


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut.", "nin_shortcut.")


# --------------------------------------------------------------------------- text encoders
def strip_text_model(key: str) -> str:
    """A ``CLIPTextModel`` weight name without ``text_model.``: transformers 5 saves it so,
    older versions with it; both map to the same original name."""
    return key[len("text_model."):] if key.startswith("text_model.") else key


def clip_links(diffusers_keys: Iterable[str], prefix: str = CLIP_PREFIX) -> list[KeyLink]:
    """Links for the CLIP ViT-L text encoder of SD 1.x (or SDXL's first, with its ``prefix``):
    Hugging Face layout in both files."""
    links = []
    for key in diffusers_keys:
        if key.endswith("position_ids"):
            continue  # a buffer, not a weight
        name = strip_text_model(key)
        if name.startswith("text_projection"):
            raise UnmappedKeyError("a text encoder with a projection is not SD 1.x's")
        links.append(KeyLink((key,), prefix + name))
    return links


_OPEN_CLIP_LAYER = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.",
                    "mlp.fc2.": "mlp.c_proj.", "self_attn.out_proj.": "attn.out_proj."}
_OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                  "embeddings.position_embedding.weight": "positional_embedding",
                  "final_layer_norm.weight": "ln_final.weight",
                  "final_layer_norm.bias": "ln_final.bias"}


def open_clip_links(diffusers_keys: Iterable[str], *, duplicate_last_layer: bool = False,
                    prefix: str = OPEN_CLIP_PREFIX) -> list[KeyLink]:
    """Links for SD 2.x's OpenCLIP text encoder (or SDXL's second, with its ``prefix``).

    Query, key and value (``q_proj``/``k_proj``/``v_proj``) join into one ``in_proj`` weight.
    SD 2.x uses the penultimate layer, so diffusers drops OpenCLIP's last block; with
    ``duplicate_last_layer`` the export writes a copy of the last diffusers layer in its place,
    so tools that expect all of OpenCLIP's blocks find them (the copy is never used: like
    kohya's sd-scripts, which fills the same gap). A ``text_projection.weight``
    (``CLIPTextModelWithProjection``, SDXL) becomes OpenCLIP's transposed ``text_projection``.
    """
    names = {strip_text_model(k): k for k in diffusers_keys if not k.endswith("position_ids")}
    layers = sorted({int(m[1]) for n in names if (m := re.match(r"encoder\.layers\.(\d+)\.", n))})
    links = []
    for name, key in names.items():
        if name in _OPEN_CLIP_TOP:
            links.append(KeyLink((key,), prefix + _OPEN_CLIP_TOP[name]))
            continue
        if name == "text_projection.weight":
            links.append(KeyLink((key,), prefix + "text_projection", transpose=True))
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.(.*)", name)
        if not m:
            raise UnmappedKeyError(f"text encoder weight {key!r} has no place in OpenCLIP's layout")
        index, rest = int(m[1]), m[2]
        targets = [index] + ([index + 1] if duplicate_last_layer and index == layers[-1] else [])
        fused = re.match(r"self_attn\.q_proj\.(weight|bias)", rest)
        if re.match(r"self_attn\.[kv]_proj\.", rest):
            continue  # joined with q_proj below
        for target in targets:
            base = f"{prefix}transformer.resblocks.{target}."
            if fused:
                kind = fused[1]
                parts = tuple(_stored_name(names, f"encoder.layers.{index}.self_attn.{p}_proj.{kind}")
                              for p in "qkv")
                links.append(KeyLink(parts, f"{base}attn.in_proj_{kind}"))
                continue
            for hf, ldm in _OPEN_CLIP_LAYER.items():
                if rest.startswith(hf):
                    links.append(KeyLink((key,), base + ldm + rest[len(hf):]))
                    break
            else:
                raise UnmappedKeyError(f"text encoder weight {key!r} has no place in OpenCLIP's "
                                       "layout")
    return links


def _stored_name(names: Mapping[str, str], name: str) -> str:
    # The stored name of text-encoder weight ``name`` (with or without ``text_model.``).
    try:
        return names[name]
    except KeyError:
        raise UnmappedKeyError(f"text encoder weight {name!r} is missing (query, key and value "
                               "must all be present)") from None


def ema_name(ldm_key: str) -> str:
    """Where an LDM training checkpoint keeps the EMA copy of UNet weight ``ldm_key``."""
    return EMA_PREFIX + ldm_key[len("model."):].replace(".", "")


__all__ = ["KeyLink", "UnmappedKeyError", "unet_links", "vae_links", "clip_links",
           "open_clip_links", "strip_text_model", "ema_name", "UNET_PREFIX", "VAE_PREFIX",
           "CLIP_PREFIX", "CLIP_PREFIX_SHORT", "OPEN_CLIP_PREFIX", "EMA_PREFIX",
           "SDXL_CLIP_PREFIX", "SDXL_OPEN_CLIP_PREFIX", "SDXL_REFINER_OPEN_CLIP_PREFIX"]
