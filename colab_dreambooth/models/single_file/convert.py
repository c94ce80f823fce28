"""Create Model: a single-file ``.safetensors``/``.ckpt`` model (Stable Diffusion 1.x, 2.x or
XL) becomes a diffusers folder.

Built for Colab's 12.7 GB of host memory: the source is read one tensor at a time (a ``.ckpt``
stays memory-mapped and its mapping is dropped every few hundred MB); each weight is renamed,
converted and streamed straight into a sharded ``.safetensors`` file, so only one tensor at a
time is ever copied into memory. The configs and the prediction type come from
:mod:`~colab_dreambooth.models.single_file.model_configs`, the key maps from
:mod:`~colab_dreambooth.models.single_file.ldm_keys`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from colab_dreambooth.files import save_folder_atomic
from colab_dreambooth.models.families import SDXL, keys_family
from colab_dreambooth.models.single_file import ldm_keys as ck
from colab_dreambooth.models.single_file.model_configs import (
    embedded_configs,
    load_model_config,
    meta_model,
    prediction_type,
    text_config_from_weights,
    unet_config_from_weights,
    vae_config_from_weights,
    write_config_folder,
)
from colab_dreambooth.models.single_file.readers import (
    RELEASE_EVERY,
    ModelFileError,
    TensorFile,
    open_model_file,
)
from colab_dreambooth.safetensors_stream import TensorSpec, element_size, write_sharded

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 1 << 30  # 1 GiB: what diffusers itself uses for large models' shards

KINDS = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x",
         "sdxl": "Stable Diffusion XL"}


@dataclass
class ConversionReport:
    """What :func:`convert_single_file` made."""

    folder: Path
    version: str  # "sd1", "sd2" or "sdxl"
    prediction_type: str  # "epsilon" or "v_prediction"
    prediction_source: str  # why that prediction type
    dtype: str
    ema: bool
    configs_from: str  # "file metadata" or "shipped configs + weight shapes"
    ignored_keys: int = 0
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{KINDS[self.version]} ({self.prediction_type}, {self.prediction_source}), "
                f"{self.dtype}"
                f"{', EMA UNet' if self.ema else ''} -> {self.folder}")


@dataclass
class _Part:
    """One model of the pipeline: its diffusers config and where each weight comes from."""

    name: str  # "unet", "vae", "text_encoder", "text_encoder_2"
    config: dict[str, Any]
    specs: list[TensorSpec]  # in the diffusers model's own order
    sources: dict[str, tuple[str, int | None]]  # diffusers key -> (file key, part of 3 or None)
    known: set[str]  # the layout's names of these weights (the plain ones when reading EMA)
    transposed: set[str] = field(default_factory=set)  # diffusers keys stored transposed


@dataclass(frozen=True)
class _Encoder:
    """Where and how a file keeps one text encoder."""

    part: str  # "text_encoder" or "text_encoder_2"
    prefix: str
    open_clip: bool  # OpenCLIP's layout (SD 2.x, SDXL's second) rather than Hugging Face's
    with_projection: bool = False  # SDXL's second: every block, and its projection


def convert_single_file(path: str | Path, out_dir: str | Path, *, v_prediction: bool | None = None,
                        fp16: bool = False, ema: bool = False, overwrite: bool = False,
                        max_shard_size: int = DEFAULT_SHARD_SIZE,
                        progress: bool = True) -> ConversionReport:
    """Convert an SD 1.x/2.x/XL single-file model into a diffusers folder at ``out_dir``.

    ``v_prediction``: True/False to say what the model predicts, None to detect it (see the
    module docs). ``fp16`` writes half-precision weights (default fp32, exact for any source).
    ``ema`` takes the UNet's EMA copy when the file holds one (``model_ema.*``). An existing
    ``out_dir`` is replaced only when empty or with ``overwrite``; it is written atomically.
    Raises :class:`ModelFileError` for unreadable, incomplete or non-SD files (and for SDXL
    refiner or inpainting files, which are not text-to-image models of their own).
    """
    path = Path(path).expanduser()
    out_dir = Path(out_dir).expanduser()
    _check_target(path, out_dir, overwrite)
    source = open_model_file(path)
    try:
        report, parts, configs = _plan(source, v_prediction=v_prediction, ema=ema)
        report.folder = out_dir
        dtype = torch.float16 if fp16 else torch.float32
        report.dtype = "fp16" if fp16 else "fp32"

        def write(tmp: Path) -> None:
            write_config_folder(configs, tmp, dtype)
            _write_weights(source, parts, tmp, dtype, max_shard_size, progress)

        save_folder_atomic(write, out_dir)
    finally:
        source.release()
    log.info("Converted %s: %s", path.name, report)
    return report


def _check_target(path: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelFileError(f"output {out_dir} exists and is not a folder")
    if out_dir.resolve() in path.resolve().parents:
        raise ModelFileError(f"output folder {out_dir} holds the checkpoint {path}: choose "
                             "another folder (it would be replaced)")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ModelFileError(f"output folder {out_dir} already exists and is not empty: choose "
                             "another folder, or allow overwriting (--overwrite)")


def _plan(source: TensorFile, *, v_prediction: bool | None, ema: bool
          ) -> tuple[ConversionReport, list[_Part], dict[str, Any]]:
    """Detect the model, choose its configs and map every weight; raise on missing keys."""
    keys = source.shapes.keys()
    version, encoders = _check_is_sd(source)
    prediction, why = prediction_type(source, version, v_prediction)
    variant = "sd2-v" if version == "sd2" and prediction == "v_prediction" else version
    base = load_model_config(variant)
    use_ema, notes = _choose_unet(keys, ema)
    derived = _derive_configs(source, base, encoders, version)
    embedded = embedded_configs(source.metadata, derived)
    configs = {**base, **derived, **embedded}
    configs["scheduler"] = {**configs["scheduler"], "prediction_type": prediction}
    if embedded:
        notes.append(f"used the configs stored in the file for: {', '.join(sorted(embedded))}")

    def unet_source(key: str) -> str:
        return ck.ema_name(key) if use_ema else key

    parts = [_map_part(source, enc.part, configs[enc.part], lambda k: k, enc) for enc in encoders]
    for part in parts:
        _accept_linear_projection(source, part)
    parts += [_map_part(source, "vae", configs["vae"], lambda k: k, None),
              _map_part(source, "unet", configs["unet"], unet_source, None)]
    _check_weights(source, parts, version, encoders,
                   configs["text_encoder"]["num_hidden_layers"] if version == "sd2" else None)
    report = ConversionReport(
        folder=Path(), version=version, prediction_type=prediction, prediction_source=why,
        dtype="", ema=use_ema,
        configs_from="file metadata" if embedded else "shipped configs + weight shapes",
        ignored_keys=len(set(keys) - {k for p in parts for k, _ in p.sources.values()}),
        notes=notes)
    for note in notes:
        log.info("%s: %s", source.path.name, note)
    return report, parts, configs


def _choose_unet(keys: Iterable[str], ema: bool) -> tuple[bool, list[str]]:
    """Whether to read the UNet's EMA copy, and a note when the file's choice differs."""
    has_ema = any(k.startswith(ck.EMA_PREFIX + "diffusion_model") for k in keys)
    if ema and not has_ema:
        return False, ["the file holds no EMA weights (model_ema.*): used the plain UNet"]
    if has_ema and not ema:
        return False, ["the file also holds EMA weights (model_ema.*); pass ema=True (--ema) to "
                       "use them instead"]
    return ema, []


def _derive_configs(source: TensorFile, base: dict[str, Any], encoders: Sequence[_Encoder],
                    version: str) -> dict[str, dict[str, Any]]:
    """The models' configs from the weights' shapes; refuse models that are not text-to-image
    SD 1.x/2.x/XL."""
    try:
        derived = {enc.part: text_config_from_weights(
            _sub(source.shapes, enc.prefix), base[enc.part], enc.open_clip,
            with_projection=enc.with_projection) for enc in encoders}
        pooled = derived["text_encoder_2"]["projection_dim"] if version == "sdxl" else None
        derived["vae"] = vae_config_from_weights(_sub(source.shapes, ck.VAE_PREFIX), base["vae"])
        derived["unet"] = unet_config_from_weights(_sub(source.shapes, ck.UNET_PREFIX),
                                                   base["unet"], pooled)
    except (KeyError, ValueError, IndexError) as exc:
        raise ModelFileError(f"{source.path} does not have the layout of a {KINDS[version]} "
                             f"checkpoint ({type(exc).__name__}: {exc})") from exc
    channels = derived["unet"]["in_channels"]
    if channels != derived["vae"]["latent_channels"]:
        kind = {9: "an inpainting model", 8: "an instruct-pix2pix model", 5: "a depth model"}.get(
            channels, "not a text-to-image model")
        raise ModelFileError(f"{source.path}: its UNet takes {channels} input channels, "
                             f"{kind}; only text-to-image models (4 channels) are supported")
    # SDXL's UNet reads both encoders' features side by side.
    text_width = sum(derived[enc.part]["hidden_size"] for enc in encoders)
    if derived["unet"]["cross_attention_dim"] != text_width:
        raise ModelFileError(
            f"{source.path}: its UNet expects {derived['unet']['cross_attention_dim']}-wide text "
            f"features but its text encoder(s) make {text_width}: not a consistent "
            f"{KINDS[version]} model")
    return derived


def _check_weights(source: TensorFile, parts: list[_Part], version: str,
                   encoders: Sequence[_Encoder], open_clip_layers: int | None) -> None:
    """Refuse a file that lacks weights of the model, has them in other shapes, or has weights
    a text-to-image model does not (``open_clip_layers``: the blocks SD 2.x's encoder uses)."""
    missing = sorted({key for part in parts for key, _ in part.sources.values()
                      if key not in source.shapes})
    if missing:
        raise ModelFileError(
            f"{source.path} is missing {len(missing)} weight(s) of a {KINDS[version]} "
            f"model, e.g. {', '.join(missing[:5])}: the file is incomplete or "
            "not such a checkpoint (a LoRA, a VAE or a UNet alone?)")
    _check_shapes(source, parts)
    used = set().union(*(part.known for part in parts))
    unused_ok = ([ck.OPEN_CLIP_PREFIX + f"transformer.resblocks.{open_clip_layers}."]
                 if open_clip_layers is not None else [])
    prefixes = (ck.UNET_PREFIX, ck.VAE_PREFIX, *(enc.prefix for enc in encoders))
    stray = [k for k in source.shapes if k.startswith(prefixes)
             and k not in used and not _ignorable(k, unused_ok)]
    if stray:
        raise ModelFileError(
            f"{source.path} has {len(stray)} weight(s) that a {KINDS[version]} text-to-image "
            f"model does not have, e.g. {', '.join(stray[:5])}: this kind of model "
            "(inpainting/upscaler/depth/ControlNet?) is not supported")


def _sub(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def _check_is_sd(source: TensorFile) -> tuple[str, list[_Encoder]]:
    """The file's version (``sd1``, ``sd2``, ``sdxl``) and where it keeps its text encoders;
    a clear error for what is not a complete text-to-image SD 1.x/2.x/XL checkpoint."""
    keys = list(source.shapes)
    path = source.path
    if not keys:
        raise ModelFileError(f"{path} holds no weights")
    sdxl = keys_family(keys) == SDXL
    if not sdxl and any(k.startswith("conditioner.embedders.") for k in keys):
        if any(k.startswith(ck.SDXL_REFINER_OPEN_CLIP_PREFIX) for k in keys):
            raise ModelFileError(
                f"{path} is an SDXL refiner (one OpenCLIP text encoder, conditioner.embedders.0."
                "model.*): it only refines other models' images; give an SDXL base model or a "
                "fine-tune of it")
        raise ModelFileError(f"{path} has SDXL text encoder weights (conditioner.embedders.*) "
                             "but not SDXL's second text encoder (conditioner.embedders.1.*): an "
                             "incomplete SDXL checkpoint or another kind of model")
    if not any(k.startswith(ck.UNET_PREFIX) for k in keys):
        hint = ""
        if any("lora" in k.lower() for k in keys[:50]):
            hint = " It looks like a LoRA: load it on top of a base model instead."
        elif any(k.startswith(("down_blocks.", "encoder.", "text_model.", "encoder.layers."))
                 for k in keys):
            hint = " It looks like a single diffusers part (UNet, VAE or text encoder) alone."
        raise ModelFileError(f"{path} is not a Stable Diffusion checkpoint: it has no UNet "
                             f"weights under {ck.UNET_PREFIX}.{hint}")
    if sdxl and not any(k.startswith(ck.SDXL_CLIP_PREFIX) for k in keys):
        raise ModelFileError(f"{path} has no first text encoder ({ck.SDXL_CLIP_PREFIX}*): not a "
                             "complete Stable Diffusion XL checkpoint")
    if not sdxl and not any(k.startswith((ck.CLIP_PREFIX_SHORT, ck.OPEN_CLIP_PREFIX))
                            for k in keys):
        raise ModelFileError(f"{path} has no text encoder weights (cond_stage_model.*): not a "
                             "complete Stable Diffusion 1.x/2.x checkpoint")
    if not any(k.startswith(ck.VAE_PREFIX) for k in keys):
        raise ModelFileError(f"{path} has no VAE weights ({ck.VAE_PREFIX}*): not a complete "
                             "Stable Diffusion checkpoint (add a VAE with a merging tool)")
    if sdxl:
        return "sdxl", [_Encoder("text_encoder", ck.SDXL_CLIP_PREFIX, open_clip=False),
                        _Encoder("text_encoder_2", ck.SDXL_OPEN_CLIP_PREFIX, open_clip=True,
                                 with_projection=True)]
    if any(k.startswith(ck.OPEN_CLIP_PREFIX) for k in keys):
        return "sd2", [_Encoder("text_encoder", ck.OPEN_CLIP_PREFIX, open_clip=True)]
    # Some SD 1.x files (old transformers) lack the ``text_model.`` level.
    clip_prefix = (ck.CLIP_PREFIX if any(k.startswith(ck.CLIP_PREFIX) for k in keys)
                   else ck.CLIP_PREFIX_SHORT)
    return "sd1", [_Encoder("text_encoder", clip_prefix, open_clip=False)]


def _ignorable(key: str, prefixes: Sequence[str]) -> bool:
    # Weights that SD files carry but diffusers does not use: the VAE's training loss, CLIP's
    # position ids, OpenCLIP's logit scale, SD 2.x's projection and the block after the one
    # SD 2.x reads.
    return (key.endswith("position_ids") or key.startswith(f"{ck.VAE_PREFIX}loss.")
            or key.startswith(tuple(prefixes))
            or key in (ck.OPEN_CLIP_PREFIX + "text_projection",
                       ck.OPEN_CLIP_PREFIX + "logit_scale",
                       ck.SDXL_OPEN_CLIP_PREFIX + "logit_scale"))


def _map_part(source: TensorFile, name: str, config: dict[str, Any],
              source_key: Callable[[str], str], encoder: _Encoder | None) -> _Part:
    state = meta_model(name, config).state_dict()
    if name == "unet":
        links = ck.unet_links(state, config)
    elif name == "vae":
        links = ck.vae_links(state, config)
    elif encoder is not None and encoder.open_clip:
        links = ck.open_clip_links(state, prefix=encoder.prefix)
    else:
        links = ck.clip_links(state, prefix=encoder.prefix if encoder else ck.CLIP_PREFIX)
    sources: dict[str, tuple[str, int | None]] = {}
    for link in links:
        for index, key in enumerate(link.diffusers):
            sources[key] = (source_key(link.ldm), index if link.fused else None)
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in state.items() if k in sources]
    known = {link.ldm for link in links} | {key for key, _ in sources.values()}
    transposed = {key for link in links if link.transpose for key in link.diffusers}
    return _Part(name, config, specs, sources, known, transposed)


def _accept_linear_projection(source: TensorFile, part: _Part) -> None:
    """Read a projection that a file keeps as a linear layer's weight (``text_projection.weight``,
    as some tools save SDXL) instead of OpenCLIP's transposed matrix: as it is."""
    for key in sorted(part.transposed):
        name, index = part.sources[key]
        if name not in source.shapes and name + ".weight" in source.shapes:
            part.sources[key] = (name + ".weight", index)
            part.known.add(name + ".weight")
            part.transposed.discard(key)


def _check_shapes(source: TensorFile, parts: list[_Part]) -> None:
    wrong = []
    for part in parts:
        for spec in part.specs:
            key, index = part.sources[spec.name]
            shape = source.shapes[key]
            if index is not None:
                shape = (shape[0] // 3,) + tuple(shape[1:])
            if spec.name in part.transposed:
                shape = tuple(reversed(shape))
            if not _same_shape(shape, spec.shape):
                wrong.append(f"{key} is {list(shape)}, expected {list(spec.shape)}")
    if wrong:
        raise ModelFileError(f"{source.path}: {len(wrong)} weight(s) have unexpected shapes, "
                             f"e.g. {'; '.join(wrong[:3])}: the file is damaged or a kind of "
                             "model this converter does not support")


def _same_shape(a: Sequence[int], b: Sequence[int]) -> bool:
    # 1x1 convolutions and linear layers hold the same numbers (VAE attention, proj_in/out).
    strip = lambda s: tuple(s[:2]) if len(s) > 2 and all(d == 1 for d in s[2:]) else tuple(s)
    return strip(a) == strip(b)


def _write_weights(source: TensorFile, parts: list[_Part], folder: Path, dtype: torch.dtype,
                   max_shard_size: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    total = sum(math.prod(s.shape) for p in parts for s in p.specs) * element_size(dtype)
    read_since_release = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc="Converting",
              disable=not progress) as bar:
        for part in parts:

            def produce(spec: TensorSpec, part: _Part = part) -> torch.Tensor:
                nonlocal read_since_release
                if read_since_release > RELEASE_EVERY:
                    source.release()
                    read_since_release = 0
                key, index = part.sources[spec.name]
                tensor = source.get(key)
                read_since_release += tensor.numel() * tensor.element_size()
                if index is not None:  # a view: only the fused tensor itself is in memory
                    tensor = tensor.chunk(3, dim=0)[index]
                if spec.name in part.transposed:
                    tensor = tensor.t().contiguous()
                return tensor.reshape(spec.shape).to(dtype if spec.dtype.is_floating_point
                                                      else spec.dtype)

            specs = [TensorSpec(s.name, s.shape, dtype if s.dtype.is_floating_point else s.dtype)
                     for s in part.specs]
            stem = "model" if part.name.startswith("text_encoder") else "diffusion_pytorch_model"
            write_sharded(folder / part.name, stem, specs, produce, max_shard_size, bar.update)


__all__ = ["convert_single_file", "ConversionReport", "ModelFileError", "DEFAULT_SHARD_SIZE"]
