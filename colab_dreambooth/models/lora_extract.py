"""Extract a LoRA from a fully fine-tuned model: its difference from the base, by SVD.

What kohya's ``networks/extract_lora_from_models.py`` does, on the models this package loads
(a diffusers folder, a run's folder, a ``.safetensors``/``.ckpt`` file, a Hub id or ``tiny``):

* the layers are kohya's LoRA targets: every ``Linear`` and 1x1 ``Conv2d`` inside the UNet's
  ``Transformer2DModel`` blocks (``proj_in``, ``proj_out``, ``to_q/k/v``, ``to_out.0``,
  ``ff.net.0.proj``, ``ff.net.2``) and the text encoder's ``CLIPAttention``/``CLIPMLP`` (SDXL:
  both text encoders, as ``lora_te1_``/``lora_te2_``); with a
  conv rank also the layers of ``ResnetBlock2D``/``Downsample2D``/``Upsample2D`` (their 3x3
  convolutions at the conv rank, kohya's LoCon; their ``Linear``/1x1 layers at the rank);
* per layer ``delta = tuned - base`` (a 3x3 kernel flattened to ``out x in*9``), its SVD
  truncated to the rank (capped at the layer's smaller side, then zero-padded back so that
  every layer of a kind has one rank and alpha), ``up = U * S``, ``down = Vh``, both clamped
  to the ``clamp_quantile`` of their values, ``alpha`` = the rank (scale 1);
* the text encoder is left out when no weight of it changed by more than ``min_diff`` (a
  UNet-only fine-tune), as in kohya.

The file is in kohya's key layout (``lora_unet_..._attn1_to_q.lora_down.weight`` ...), which the
WebUI, ComfyUI and diffusers' ``load_lora_weights`` read, with kohya's ``ss_*`` and SAI's
``modelspec.*`` metadata. Only names of models go into it, never this machine's paths.

Host memory stays small: the layer list comes from the models' configs (modules built on
torch's ``meta`` device, no weights), and the weights are read one tensor at a time from the
safetensors files, so at most one layer of each model and its SVD are in memory (plus the
LoRA being built: ~40 MB at rank 32 for SD 1.5).

Example::

    report = extract_lora("stable-diffusion-v1-5/stable-diffusion-v1-5",
                          "models/dreambooth/my-dog", rank=32)
    print(report.summary())
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from colab_dreambooth.errors import ModelLoadError, UserError
from colab_dreambooth.models.families import architecture_names, unet_version
from colab_dreambooth.models.lora import AdapterPlan, adapter_plan, metadata_model_name
from colab_dreambooth.models.lora_file import (
    SDXL_TEXT_PREFIXES,
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    kohya_key,
    save_lora,
)
from colab_dreambooth.models.low_rank import (
    default_device,
    low_rank_factors,
    pad_rank,
    relative_error,
)
from colab_dreambooth.models.pipelines import lora_run, resolve_model
from colab_dreambooth.models.single_file.base_weights import BaseWeights

log = logging.getLogger(__name__)

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
               "float": torch.float32}  # "float": kohya's name for fp32
UNET = "unet"
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"  # SDXL's second (OpenCLIP bigG)
PARTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)


class ExtractError(UserError, ValueError):
    """The extraction cannot be done as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Layer:
    """One layer to extract: where its weight is and what kohya calls it."""

    part: str  # "unet", "text_encoder" or "text_encoder_2" (the diffusers sub-folder)
    weight: str  # the weight's name in that sub-folder's files (text_model. stripped)
    key: str  # kohya's name, e.g. lora_unet_..._attn1_to_q
    conv3x3: bool  # a 3x3 convolution (takes the conv rank)


@dataclass
class ExtractReport:
    """What :func:`extract_lora` wrote, and how well the LoRA reproduces the fine-tuning."""

    path: Path
    rank: int
    conv_rank: int
    save_precision: str
    layers: dict[str, int]  # layers written per part
    unchanged: dict[str, int]  # layers left out because tuned == base there
    text_encoder: bool  # whether the text encoder(s) are in the file
    text_encoder_max_diff: float  # its largest weight change (compared with min_diff)
    min_diff: float
    # ||delta - up @ down|| / ||delta|| per kohya key, with the factors as saved.
    errors: dict[str, float] = field(default_factory=dict)
    key_parts: dict[str, str] = field(default_factory=dict)  # kohya key -> part
    file_bytes: int = 0
    seconds: float = 0.0

    def error_summary(self, part: str | None = None) -> tuple[float, float, str]:
        """``(mean, max, worst layer)`` of the relative errors of ``part`` (all when None)."""
        errors = {k: e for k, e in self.errors.items()
                  if part is None or self.key_parts.get(k) == part}
        if not errors:
            return 0.0, 0.0, ""
        worst = max(errors, key=errors.__getitem__)
        return sum(errors.values()) / len(errors), errors[worst], worst

    def summary(self) -> str:
        """A few lines for people: the file, its layers, and the error that guides the rank."""
        conv = f", conv rank {self.conv_rank}" if self.conv_rank else ""
        lines = [f"Wrote {self.path} ({self.file_bytes / 1e6:.1f} MB, rank {self.rank}{conv}, "
                 f"{self.save_precision}) in {self.seconds:.1f} s."]
        for part in PARTS:
            if not self.layers.get(part):
                continue
            mean, worst, key = self.error_summary(part)
            line = (f"  {part:12} {self.layers[part]:4} layers, reconstruction error mean "
                    f"{mean:.1%}, max {worst:.1%} ({key})")
            if self.unchanged.get(part):
                line += f"; {self.unchanged[part]} unchanged layers left out"
            lines.append(line)
        if not self.text_encoder:
            lines.append(f"  text_encoder left out: its largest change, "
                         f"{self.text_encoder_max_diff:.3g}, is not above min_diff "
                         f"{self.min_diff:g} (lower --min-diff to include it)")
        lines.append("  (error: ||change - LoRA|| / ||change|| per layer; a higher rank lowers "
                     "it, a clamp quantile below 1 raises it)")
        return "\n".join(lines)


def extract_lora(base: str | os.PathLike, tuned: str | os.PathLike,
                 out: str | os.PathLike | None = None, *, rank: int = 32, conv_rank: int = 0,
                 clamp_quantile: float = 0.99, min_diff: float = 0.01,
                 save_precision: str = "fp16", overwrite: bool = False,
                 device: str | None = None, progress: bool = True) -> ExtractReport:
    """Write ``tuned - base`` as a kohya-layout LoRA file and return what was written.

    ``base`` and ``tuned`` are anything :func:`colab_dreambooth.models.pipelines.resolve_model`
    loads; both must have the same architecture. ``out`` defaults to
    :func:`default_output` (beside the tuned model) and is never replaced unless ``overwrite``.
    ``rank`` applies to the Linear and 1x1 layers, ``conv_rank`` (0: none) to the 3x3
    convolutions; ``clamp_quantile`` 1.0 turns kohya's clamping off. ``save_precision`` is
    ``fp16``, ``bf16`` or ``fp32``. The SVDs run on ``device`` (default: CUDA when available)
    in fp32, on the CPU through float64 Gram matrices (:func:`top_singular`)."""
    start = time.monotonic()
    _check_numbers(rank, conv_rank, clamp_quantile, min_diff, save_precision)
    out = Path(out).expanduser() if out else default_output(tuned, rank, conv_rank)
    _check_output(out, overwrite)  # before any download or conversion
    for model in (base, tuned):
        run = lora_run(model) if Path(model).expanduser().is_dir() else None
        if run:
            raise ExtractError(f"{model} is a LoRA run: its LoRA is {run[1]} already; "
                               "extract-lora takes fully fine-tuned models")
    base_folder, tuned_folder = resolve_model(base), resolve_model(tuned)
    if base_folder.resolve() == tuned_folder.resolve():
        raise ExtractError(f"the base and the tuned model are the same model ({base_folder}): "
                           "nothing to extract")
    for folder in (base_folder, tuned_folder):
        if folder.resolve() in out.resolve().parents:
            raise ExtractError(f"{out} is inside the model folder {folder}: write it elsewhere, "
                               "the models are never modified")
    layers = target_layers(base_folder, conv=conv_rank > 0)
    base_weights, tuned_weights = BaseWeights(base_folder), BaseWeights(tuned_folder)
    try:
        _check_same_shapes(layers, base_weights, tuned_weights, base, tuned)
        te_layers = [layer for layer in layers if layer.part != UNET]  # SDXL: both
        te_diff = _max_change(te_layers, base_weights, tuned_weights, stop_above=min_diff)
        with_te = te_diff > min_diff
        if not with_te and te_layers:
            log.info("The text encoder changed by at most %.3g (min_diff %g): extracting the "
                     "UNet only", te_diff, min_diff)
        chosen = [layer for layer in layers if layer.part == UNET or with_te]
        work = torch.device(device) if device else default_device()
        state, errors, unchanged = _extract(chosen, base_weights, tuned_weights, rank=rank,
                                            conv_rank=conv_rank, clamp_quantile=clamp_quantile,
                                            dtype=SAVE_DTYPES[save_precision], device=work,
                                            progress=progress)
    finally:
        base_weights.close()
        tuned_weights.close()
    if not state:
        hint = (f" (its text encoder changed by {te_diff:.3g}, not above min_diff {min_diff:g}: "
                "lower --min-diff to extract it)" if te_diff > 0 else "")
        raise ExtractError(f"{tuned} does not differ from {base} in any layer a LoRA holds"
                           f"{hint}: nothing to extract. Is it the fine-tuned model?")
    key_parts = {layer.key: layer.part for layer in layers}
    written = {part: sum(1 for k in errors if key_parts[k] == part) for part in PARTS}
    metadata = extract_metadata(base, tuned, tuned_folder, out, rank=rank, conv_rank=conv_rank,
                                clamp_quantile=clamp_quantile, text_encoder=with_te)
    save_lora(out, state, metadata)
    report = ExtractReport(
        path=out, rank=rank, conv_rank=conv_rank, save_precision=save_precision, layers=written,
        unchanged=unchanged, text_encoder=with_te, text_encoder_max_diff=te_diff,
        min_diff=min_diff, errors=errors, key_parts=key_parts, file_bytes=out.stat().st_size,
        seconds=time.monotonic() - start)
    log.debug("%s", report.summary())  # the caller shows it (the CLI prints it)
    return report


def default_output(tuned: str | os.PathLike, rank: int, conv_rank: int = 0) -> Path:
    """``<name>_extracted_r<rank>[_c<conv rank>].safetensors`` beside the tuned model: beside
    its file, beside its diffusers folder, inside a run's folder (next to ``model/``), or in
    the current folder for a Hub id."""
    suffix = f"_extracted_r{rank}" + (f"_c{conv_rank}" if conv_rank else "") + ".safetensors"
    path = Path(tuned).expanduser()
    if path.is_file():
        return path.with_name(path.stem + suffix)
    if path.is_dir():
        path = path.resolve()
        if not (path / "model_index.json").is_file() and (path / "model").is_dir():
            return path / (path.name + suffix)  # a run's working folder
        if path.name == "model":
            return path.parent / (path.parent.name + suffix)  # <run>/model: into <run>
        return path.parent / (path.name + suffix)
    return Path.cwd() / (re.split(r"[/\\]", str(tuned).rstrip("/\\"))[-1] + suffix)  # Hub id


# ----------------------------------------------------------------------------- the layers


def target_layers(folder: Path, *, conv: bool) -> list[Layer]:
    """kohya's LoRA targets in the model ``folder``, from its configs (no weights loaded)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sdxl = (folder / TEXT_ENCODER_2).is_dir()
    prefixes = SDXL_TEXT_PREFIXES if sdxl else {TEXT_ENCODER: TEXT_ENCODER_PREFIX}
    classes = {TEXT_ENCODER: CLIPTextModel, TEXT_ENCODER_2: CLIPTextModelWithProjection}
    try:
        with torch.device("meta"):  # modules without memory: only their names and types
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(
                folder, subfolder="unet"))
            encoders = {part: classes[part](CLIPTextConfig.from_pretrained(folder / part))
                        for part in prefixes if (folder / part).is_dir()}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder} is not a Stable Diffusion diffusers folder with a UNet "
                             f"and a text encoder: {exc}") from exc
    # kohya's LoRA targets are LoCon's layers (the convolution blocks only with a conv rank).
    layers = _layers(unet, UNET, UNET_PREFIX,
                     adapter_plan(unet, "LoCon", text_encoder=False, conv=conv))
    for part, encoder in encoders.items():
        layers += _layers(encoder, part, prefixes[part],
                          adapter_plan(encoder, "LoCon", text_encoder=True))
    return layers


def _layers(model: torch.nn.Module, part: str, prefix: str, plan: AdapterPlan) -> list[Layer]:
    return [Layer(part=part, weight=_plain(f"{module}.weight"), key=kohya_key(prefix, module),
                  conv3x3=module in plan.conv) for module in plan.modules]


def _plain(name: str) -> str:
    """A text-encoder weight name without CLIP's ``text_model.`` level, which transformers 5
    dropped: files saved by 4.x and by 5.x then match."""
    return name.removeprefix("text_model.")


def _weight_name(weights: BaseWeights, layer: Layer) -> str | None:
    """The layer's weight as the folder names it: with CLIP's ``text_model.`` level
    (transformers 4) or without it (5); None when the model has no such weight."""
    index = weights.index(layer.part)
    return next((n for n in (layer.weight, "text_model." + layer.weight) if n in index), None)


def _stored_shape(weights: BaseWeights, layer: Layer) -> list[int] | None:
    name = _weight_name(weights, layer)
    return list(weights.index(layer.part)[name][1]["shape"]) if name else None


def _weight(weights: BaseWeights, layer: Layer) -> torch.Tensor:
    """The layer's weight as stored (its own dtype), on the CPU."""
    return weights.get(layer.part, _weight_name(weights, layer))


def _check_same_shapes(layers: list[Layer], base: BaseWeights, tuned: BaseWeights,
                       base_name, tuned_name) -> None:
    """Refuse two models of different architectures (SD 1.x vs 2.x), naming the first layer."""
    for layer in layers:
        base_shape, tuned_shape = _stored_shape(base, layer), _stored_shape(tuned, layer)
        if base_shape is None or base_shape != tuned_shape:
            raise ModelLoadError(
                f"{tuned_name} and {base_name} are not the same architecture: {layer.part} "
                f"layer {layer.weight} is {_shape(tuned_shape)} in the tuned model and "
                f"{_shape(base_shape)} in the base (SD 1.x vs 2.x?). Extract against the base "
                "model it was fine-tuned from")


def _shape(shape: list[int] | None) -> str:
    return "missing" if shape is None else "x".join(map(str, shape))


def _max_change(layers: list[Layer], base: BaseWeights, tuned: BaseWeights, *,
                stop_above: float) -> float:
    """The largest absolute weight change over ``layers`` (stops once above ``stop_above``)."""
    largest = 0.0
    for layer in layers:
        delta = _weight(tuned, layer).float() - _weight(base, layer).float()
        largest = max(largest, float(delta.abs().max()) if delta.numel() else 0.0)
        if largest > stop_above:
            break
    return largest


# ----------------------------------------------------------------------------- the SVD


def _extract(layers: list[Layer], base: BaseWeights, tuned: BaseWeights, *, rank: int,
             conv_rank: int, clamp_quantile: float, dtype: torch.dtype, device: torch.device,
             progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, int]]:
    state: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    unchanged = dict.fromkeys(PARTS, 0)
    with torch.no_grad():
        for layer in tqdm(layers, desc="extract LoRA", unit="layer", disable=not progress):
            delta = (_weight(tuned, layer).to(device, torch.float32)
                     - _weight(base, layer).to(device, torch.float32))
            if not delta.any():
                unchanged[layer.part] += 1  # a frozen layer: nothing a loader would add
                continue
            layer_rank = conv_rank if layer.conv3x3 else rank
            up, down = low_rank_factors(delta, layer_rank, clamp_quantile)
            up, down = pad_rank(up.to(dtype), down.to(dtype), layer_rank)
            errors[layer.key] = relative_error(delta, up, down)
            state[f"{layer.key}.lora_down.weight"] = down.cpu().contiguous()
            state[f"{layer.key}.lora_up.weight"] = up.cpu().contiguous()
            # alpha = the layer's rank: scale 1, as kohya writes it.
            state[f"{layer.key}.alpha"] = torch.tensor(down.shape[0], dtype=dtype)
            del delta, up, down
    return state, errors, unchanged


# ----------------------------------------------------------------------------- the file


def extract_metadata(base: str | os.PathLike, tuned: str | os.PathLike, tuned_folder: Path,
                     out: Path, *, rank: int, conv_rank: int, clamp_quantile: float,
                     text_encoder: bool) -> dict[str, str]:
    """kohya's minimal ``ss_*`` keys (as its extractor writes them) and SAI's ``modelspec.*``,
    plus what it was extracted from (model names only, never paths of this machine)."""
    unet_config = _read_json(tuned_folder / UNET / "config.json")
    scheduler = _read_json(tuned_folder / "scheduler" / "scheduler_config.json")
    version = unet_version(unet_config)
    v_pred = scheduler.get("prediction_type") == "v_prediction"
    base_version, architecture = architecture_names(version, v_pred)  # kohya's, SAI's
    args = {"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))} if conv_rank else {}
    resolution = {"sdxl": 1024, "sd2": 768 if v_pred else 512}.get(version, 512)
    now = time.time()
    base_name, tuned_name = metadata_model_name(str(base)), metadata_model_name(str(tuned))
    return {
        "ss_v2": str(version == "sd2"),
        "ss_base_model_version": base_version,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(rank)),
        "ss_network_args": json.dumps(args),
        "ss_network_train_unet_only": str(not text_encoder),
        "ss_sd_model_name": base_name,
        "ss_output_name": out.stem,
        "ss_training_comment": (f"extracted by colab-dreambooth extract-lora: {tuned_name} minus "
                                f"{base_name}, SVD rank {rank}"
                                + (f", conv rank {conv_rank}" if conv_rank else "")
                                + f", clamp quantile {clamp_quantile:g}"),
        "colab_dreambooth.extracted_from": tuned_name,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture + "/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": out.stem,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
    }


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _check_numbers(rank, conv_rank, clamp_quantile, min_diff, save_precision) -> None:
    problems = []
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        problems.append(f"rank must be a whole number of at least 1, got {rank!r}")
    if isinstance(conv_rank, bool) or not isinstance(conv_rank, int) or conv_rank < 0:
        problems.append(f"conv rank must be a whole number, 0 for none, got {conv_rank!r}")
    if not 0.0 < clamp_quantile <= 1.0:
        problems.append(f"clamp quantile must be above 0 and at most 1 (1: no clamping), got "
                        f"{clamp_quantile!r}")
    if not min_diff >= 0.0:
        problems.append(f"min diff must be 0 or more, got {min_diff!r}")
    if save_precision not in SAVE_DTYPES:
        problems.append(f"save precision must be one of {', '.join(SAVE_DTYPES)}, got "
                        f"{save_precision!r}")
    if problems:
        raise ExtractError("; ".join(problems))


def _check_output(out: Path, overwrite: bool) -> None:
    if out.suffix.lower() != ".safetensors":
        raise ExtractError(f"{out}: the LoRA is written as .safetensors; name the file so")
    if out.is_dir():
        raise ExtractError(f"{out} is a folder: name the .safetensors file to write")
    if out.exists() and not overwrite:
        raise ExtractError(f"{out} already exists: choose another name with --out, or pass "
                           "--overwrite (overwrite=True) to replace it")


__all__ = ["extract_lora", "ExtractReport", "ExtractError", "default_output", "target_layers",
           "extract_metadata", "Layer", "SAVE_DTYPES"]
