"""The diffusers configs of an SD 1.x/2.x/XL model: the shipped ones (``configs/``), the ones
its LDM weights' shapes imply, the ones our exporter embeds in a file, and its prediction type.

Works offline: the diffusers configs of SD 1.x, SD 2.x base (512, epsilon), SD 2.x 768
(v-prediction) and SDXL base 1.0 ship in ``configs/``, and whatever the weights' shapes say
(widths, layers, transformer depths, cross-attention size) overrides them, so SD- and
SDXL-shaped models of any size convert too.

How the prediction type is chosen (it cannot be read from the weights): the caller's
``v_prediction``, else the file's metadata (the scheduler config our exporter embeds,
``modelspec.prediction_type``, kohya's ``ss_v_parameterization``), else a ``.yaml`` beside
the file with ``parameterization: "v"`` (AUTOMATIC1111's convention), else the rule diffusers
uses: SD 1.x and SDXL are epsilon; SD 2.x is the 768-px v-prediction model unless the
checkpoint's ``global_step`` is 875000 (SD 2.x base, 512 px, epsilon).
"""

from __future__ import annotations

import json
import logging
import math
import re
from functools import reduce
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from colab_dreambooth.models.single_file.readers import TensorFile
from colab_dreambooth.models.tiny import clip_tokenizer

log = logging.getLogger(__name__)

VARIANTS = ("sd1", "sd2", "sd2-v", "sdxl")

# safetensors metadata keys under which our exporter embeds each part's diffusers config.
CONFIG_METADATA_KEYS = {"unet": "colab_dreambooth.unet_config",
                        "vae": "colab_dreambooth.vae_config",
                        "text_encoder": "colab_dreambooth.text_encoder_config",
                        "text_encoder_2": "colab_dreambooth.text_encoder_2_config",
                        "scheduler": "colab_dreambooth.scheduler_config"}

SD2_BASE_GLOBAL_STEP = 875000  # SD 2.0/2.1-base checkpoints; diffusers' convert_from_ckpt rule


def load_model_config(variant: str) -> dict[str, Any]:
    """The shipped diffusers configs of ``sd1``, ``sd2`` (base, 512, epsilon), ``sd2-v``
    (768, v-prediction) or ``sdxl`` (base 1.0): a dict with ``unet``, ``vae``,
    ``text_encoder``, ``tokenizer`` and ``scheduler`` sections (SDXL: also ``text_encoder_2``
    and ``tokenizer_2``)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    text = (resources.files(__package__) / "configs" / f"{variant}.json").read_text("utf-8")
    return json.loads(text)


def write_config_folder(configs: dict[str, Any], folder: str | Path,
                        dtype: torch.dtype = torch.float32) -> Path:
    """Write a diffusers folder without weights: ``model_index.json``, the configs and the
    tokenizer(s). ``configs`` is :func:`load_model_config`'s dict (or one made like it); with a
    ``text_encoder_2`` section the folder is a ``StableDiffusionXLPipeline``'s. Also what
    ``from_single_file(path, config=folder)`` needs to work offline."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        UNet2DConditionModel.from_config(_plain(configs["unet"])).save_config(folder / "unet")
        AutoencoderKL.from_config(_plain(configs["vae"])).save_config(folder / "vae")
    sdxl = "text_encoder_2" in configs
    encoders = {"text_encoder": "CLIPTextModel"}
    if sdxl:
        encoders["text_encoder_2"] = "CLIPTextModelWithProjection"
    for part, architecture in encoders.items():
        text_config = CLIPTextConfig(**_plain(configs[part]))
        text_config.architectures = [architecture]
        text_config.dtype = str(dtype).removeprefix("torch.")
        text_config.save_pretrained(folder / part)
    scheduler_config = dict(configs["scheduler"])
    scheduler_cls = getattr(diffusers, scheduler_config.get("_class_name", ""),
                            diffusers.PNDMScheduler)
    scheduler_cls.from_config(_plain(scheduler_config)).save_config(folder / "scheduler")
    for part in ("tokenizer", "tokenizer_2") if sdxl else ("tokenizer",):
        tokenizer = clip_tokenizer()
        pad = configs.get(part, {}).get("pad_token")
        if pad and pad != tokenizer.pad_token:
            tokenizer.pad_token = pad  # SD 2.x and SDXL's second pad with "!", same BPE otherwise
        tokenizer.save_pretrained(folder / part)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "requires_safety_checker": False, "safety_checker": [None, None],
             "scheduler": ["diffusers", scheduler_cls.__name__],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    if sdxl:
        del index["requires_safety_checker"], index["safety_checker"]
        index.update({"_class_name": "StableDiffusionXLPipeline",
                      "force_zeros_for_empty_prompt": True,
                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"]})
        index = dict(sorted(index.items()))
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return folder


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    """A config without bookkeeping keys (``_class_name``, ``_diffusers_version``, ...)."""
    return {k: v for k, v in config.items()
            if not k.startswith("_") and k not in ("architectures", "transformers_version",
                                                   "dtype", "torch_dtype")}


def meta_model(name: str, config: dict[str, Any]) -> torch.nn.Module:
    """The diffusers/transformers model of ``config`` with no memory behind its weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        if name == "unet":
            return UNet2DConditionModel.from_config(_plain(config))
        if name == "vae":
            return AutoencoderKL.from_config(_plain(config))
        if name == "text_encoder_2":  # SDXL's OpenCLIP bigG, with its projection
            return CLIPTextModelWithProjection(CLIPTextConfig(**_plain(config)))
        return CLIPTextModel(CLIPTextConfig(**_plain(config)))


def _indices(keys: Iterable[str], pattern: str) -> list[int]:
    found = {int(m[1]) for k in keys if (m := re.match(pattern, k))}
    return sorted(found)


def _dim(shapes: dict[str, tuple[int, ...]], key: str, axis: int, default: int) -> int:
    # A size read from one weight; when that weight is missing the missing-weights check
    # reports it by name later, so a default keeps the derivation going until then.
    shape = shapes.get(key)
    return shape[axis] if shape is not None and len(shape) > axis else default


def _cycle(values: Sequence[int], n: int) -> list[int]:
    return [values[min(i, len(values) - 1)] for i in range(n)]


def _groups(widths: Iterable[int], preferred: int) -> int:
    """GroupNorm groups: the shipped value when it divides every width, else the largest
    divisor of them all up to it (tiny models use narrower widths)."""
    common = reduce(math.gcd, widths)
    if common % preferred == 0:
        return preferred
    return max(d for d in range(1, min(preferred, common) + 1) if common % d == 0)


def unet_config_from_weights(shapes: dict[str, tuple[int, ...]], base: dict[str, Any],
                             pooled_dim: int | None = None) -> dict:
    """The UNet's diffusers config from its LDM weight shapes (names without the prefix).

    SDXL (``base`` with per-level ``transformer_layers_per_block``): the depth of each level and
    the size/pooled-text embedding too; ``pooled_dim``, the second text encoder's projection
    width, splits that embedding's input into pooled text and six size/crop numbers."""
    keys = shapes.keys()
    inputs = _indices(keys, r"input_blocks\.(\d+)\.")
    n_blocks = len(_indices(keys, r"input_blocks\.(\d+)\.0\.op\.weight")) + 1
    if not inputs or (len(inputs) - n_blocks) % n_blocks:
        raise ValueError("the UNet's input blocks do not form SD's layout")
    layers = (len(inputs) - n_blocks) // n_blocks
    first = [(layers + 1) * b + 1 for b in range(n_blocks)]
    widths = [_dim(shapes, f"input_blocks.{n}.0.out_layers.3.weight", 0, w)
              for n, w in zip(first, _cycle(base["block_out_channels"], n_blocks))]
    down = ["CrossAttnDownBlock2D" if f"input_blocks.{n}.1.proj_in.weight" in shapes
            else "DownBlock2D" for n in first]
    up = ["CrossAttnUpBlock2D" if f"output_blocks.{(layers + 1) * i}.1.proj_in.weight" in shapes
          else "UpBlock2D" for i in range(n_blocks)]
    attn = [k for k in keys if k.endswith("attn2.to_k.weight")]
    proj = [shapes[k] for k in keys if k.endswith(".proj_in.weight")]
    depth: int | list[int] = 1
    if "CrossAttnDownBlock2D" in down:
        block = first[down.index("CrossAttnDownBlock2D")]
        depth = len(_indices(keys, rf"input_blocks\.{block}\.1\.transformer_blocks\.(\d+)\."))
    if isinstance(base.get("transformer_layers_per_block"), list):
        # SDXL: a depth per level (1 where a level has no attention, as SDXL's config says).
        depth = [len(_indices(keys, rf"input_blocks\.{n}\.1\.transformer_blocks\.(\d+)\."))
                 or 1 for n in first]
    derived = {
        "in_channels": _dim(shapes, "input_blocks.0.0.weight", 1, base["in_channels"]),
        "out_channels": _dim(shapes, "out.2.weight", 0, base["out_channels"]),
        "block_out_channels": widths,
        "layers_per_block": layers,
        "down_block_types": down,
        "up_block_types": up,
        "cross_attention_dim": shapes[attn[0]][1] if attn else base["cross_attention_dim"],
        "use_linear_projection": bool(proj) and len(proj[0]) == 2,
        "transformer_layers_per_block": depth,
    }
    if "label_emb.0.0.weight" in shapes:  # SDXL: pooled text + size/crop numbers
        embed_in = shapes["label_emb.0.0.weight"][1]
        derived["addition_embed_type"] = "text_time"
        derived["projection_class_embeddings_input_dim"] = embed_in
        if pooled_dim is not None and (embed_in - pooled_dim) % 6 == 0 and embed_in > pooled_dim:
            derived["addition_time_embed_dim"] = (embed_in - pooled_dim) // 6
    config = {**base, **derived}
    if widths != list(base["block_out_channels"]):
        config["norm_num_groups"] = _groups(widths, base.get("norm_num_groups", 32))
        if derived["use_linear_projection"]:  # SD 2.x: 64 channels per head
            config["attention_head_dim"] = [max(1, w // 64) for w in widths]
        elif any(w % base["attention_head_dim"] for w in widths):
            config["attention_head_dim"] = 1
    if derived["use_linear_projection"] != base.get("use_linear_projection", False):
        # An SD 2.x-shaped UNet on SD 1.x configs, or the reverse: heads follow the layout.
        config["attention_head_dim"] = ([max(1, w // 64) for w in widths]
                                        if derived["use_linear_projection"] else 8)
    return config


def vae_config_from_weights(shapes: dict[str, tuple[int, ...]], base: dict[str, Any]) -> dict:
    """The VAE's diffusers config from its LDM weight shapes (names without the prefix)."""
    keys = shapes.keys()
    blocks = _indices(keys, r"encoder\.down\.(\d+)\.")
    layers = _indices(keys, r"encoder\.down\.0\.block\.(\d+)\.")
    if not blocks or not layers:
        raise ValueError("the VAE's encoder blocks are missing")
    widths = [_dim(shapes, f"encoder.down.{i}.block.0.conv1.weight", 0, w)
              for i, w in zip(blocks, _cycle(base["block_out_channels"], len(blocks)))]
    derived = {
        "in_channels": _dim(shapes, "encoder.conv_in.weight", 1, base["in_channels"]),
        "out_channels": _dim(shapes, "decoder.conv_out.weight", 0, base["out_channels"]),
        "latent_channels": _dim(shapes, "decoder.conv_in.weight", 1, base["latent_channels"]),
        "block_out_channels": widths,
        "layers_per_block": len(layers),
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
    }
    config = {**base, **derived}
    if widths != list(base["block_out_channels"]):
        config["norm_num_groups"] = _groups(widths, base.get("norm_num_groups", 32))
    return config


def text_config_from_weights(shapes: dict[str, tuple[int, ...]], base: dict[str, Any],
                             open_clip: bool, *, with_projection: bool = False) -> dict:
    """The text encoder's ``CLIPTextConfig`` from its LDM weight shapes (names without the
    prefix). SD 2.x's OpenCLIP files hold one block more than diffusers keeps (see module
    docs); ``with_projection`` (SDXL's second encoder) keeps every block and the projection."""
    if open_clip:
        vocab, hidden = shapes["token_embedding.weight"]
        positions = _dim(shapes, "positional_embedding", 0, base["max_position_embeddings"])
        blocks = _indices(shapes, r"transformer\.resblocks\.(\d+)\.")
        intermediate = _dim(shapes, "transformer.resblocks.0.mlp.c_fc.weight", 0,
                            base["intermediate_size"])
        # SD 2.x runs the penultimate block; real files (and our exports) hold one more, with
        # OpenCLIP's text_projection. Without it the file already ends at the used block.
        layers = len(blocks) - (1 if "text_projection" in shapes and not with_projection else 0)
    else:
        vocab, hidden = shapes["embeddings.token_embedding.weight"]
        positions = _dim(shapes, "embeddings.position_embedding.weight", 0,
                         base["max_position_embeddings"])
        layers = len(_indices(shapes, r"encoder\.layers\.(\d+)\."))
        intermediate = _dim(shapes, "encoder.layers.0.mlp.fc1.weight", 0, base["intermediate_size"])
    config = {**base, "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
              "intermediate_size": intermediate, "max_position_embeddings": positions}
    if hidden != base["hidden_size"]:
        config["num_attention_heads"] = max(1, hidden // 64) if hidden % 64 == 0 else 1
        config["projection_dim"] = hidden
    if with_projection:  # OpenCLIP's matrix [hidden, projection], or a linear layer's weight
        config["projection_dim"] = (_dim(shapes, "text_projection", 1, config["projection_dim"])
                                    if "text_projection" in shapes else
                                    _dim(shapes, "text_projection.weight", 0,
                                         config["projection_dim"]))
    return config


def prediction_type(source: TensorFile, version: str, v_prediction: bool | None
                     ) -> tuple[str, str]:
    """``(prediction_type, why)`` of ``source``, an SD ``version`` (``sd1``/``sd2``/``sdxl``);
    see the module docstring for the order of the clues."""
    if v_prediction is not None:
        return ("v_prediction" if v_prediction else "epsilon"), "as asked"
    meta = source.metadata
    stored = meta.get(CONFIG_METADATA_KEYS["scheduler"])
    if stored:
        try:
            kind = json.loads(stored)["prediction_type"]
            if kind in ("epsilon", "v_prediction"):
                return kind, "the file's stored scheduler config"
        except (ValueError, KeyError, TypeError):
            pass
    spec = meta.get("modelspec.prediction_type", "").strip().lower()
    if spec in ("v", "v_prediction", "epsilon"):
        return ("epsilon" if spec == "epsilon" else "v_prediction"), "modelspec.prediction_type"
    kohya = meta.get("ss_v_parameterization", "").strip().lower()
    if kohya in ("true", "false"):
        return ("v_prediction" if kohya == "true" else "epsilon"), "ss_v_parameterization"
    for yaml_path in (source.path.with_suffix(".yaml"), source.path.with_suffix(".yml")):
        if yaml_path.is_file():
            text = yaml_path.read_text(encoding="utf-8", errors="replace")
            v = re.search(r"^\s*parameterization\s*:\s*[\"']?v[\"']?\s*$", text, re.M)
            return ("v_prediction" if v else "epsilon"), f"{yaml_path.name} beside the file"
    if version == "sd2":
        if source.global_step == SD2_BASE_GLOBAL_STEP:
            return "epsilon", f"SD 2.x base (global_step {SD2_BASE_GLOBAL_STEP})"
        return "v_prediction", "SD 2.x default (768-px v model, as diffusers assumes)"
    return "epsilon", "SDXL default" if version == "sdxl" else "SD 1.x default"


def embedded_configs(metadata: dict[str, str], derived: dict[str, dict]) -> dict[str, dict]:
    """Configs our exporter stored in the file, kept where they agree with the weights."""
    found = {}
    for part, key in CONFIG_METADATA_KEYS.items():
        if key not in metadata:
            continue
        try:
            config = json.loads(metadata[key])
        except ValueError:
            continue
        if not isinstance(config, dict):
            continue
        if part in derived:
            clash = [k for k, v in derived[part].items() if k in _SHAPE_FIELDS[part]
                     and _norm(config.get(k)) != _norm(v)]
            if clash:
                log.warning("ignoring the %s config stored in the file: it disagrees with the "
                            "weights on %s", part, ", ".join(clash))
                continue
        found[part] = config
    return found


_SHAPE_FIELDS = {
    "unet": ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
             "down_block_types", "up_block_types", "cross_attention_dim", "use_linear_projection",
             "projection_class_embeddings_input_dim"),
    "vae": ("in_channels", "out_channels", "latent_channels", "block_out_channels",
            "layers_per_block"),
    "text_encoder": ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                     "max_position_embeddings"),
    "text_encoder_2": ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                       "max_position_embeddings", "projection_dim"),
}


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


__all__ = ["VARIANTS", "CONFIG_METADATA_KEYS", "load_model_config", "write_config_folder",
           "meta_model", "unet_config_from_weights", "vae_config_from_weights",
           "text_config_from_weights", "prediction_type", "embedded_configs"]
