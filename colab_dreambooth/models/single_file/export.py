"""Export: a diffusers folder becomes one single-file model in the original (LDM) key layout.

The file loads in AUTOMATIC1111, ComfyUI and other tools, and back here with Create Model:
UNet under ``model.diffusion_model.``, VAE under ``first_stage_model.``, text encoder under
``cond_stage_model.transformer.text_model.`` (SD 1.x) or in OpenCLIP's layout under
``cond_stage_model.model.`` (SD 2.x); SDXL's two text encoders under ``conditioner.embedders.0.``
(CLIP ViT-L) and ``conditioner.embedders.1.model.`` (OpenCLIP bigG, OpenCLIP's layout).
``.safetensors`` is written tensor by tensor (memory stays
near one tensor); ``.ckpt`` is a ``{"state_dict": ...}`` ``torch.save`` that loads with
``weights_only=True`` and needs the whole model in memory. No optimizer or training state goes
in; the training facts (base model, instance prompts, steps) and the diffusers configs go in the
safetensors header (``__metadata__``) or the ``.ckpt``'s ``metadata`` entry, never a token.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from colab_dreambooth.files import temp_file_beside
from colab_dreambooth.models.families import architecture_names
from colab_dreambooth.models.single_file import ldm_keys as ck
from colab_dreambooth.models.single_file.model_configs import CONFIG_METADATA_KEYS
from colab_dreambooth.models.single_file.readers import (
    RELEASE_EVERY,
    ModelFileError,
    SafetensorsFile,
    TensorFile,
    TorchFile,
)
from colab_dreambooth.safetensors_stream import TensorSpec, write_safetensors

log = logging.getLogger(__name__)

FORMATS = (".safetensors", ".ckpt")
# OpenCLIP's initial logit scale, ln(1/0.07): what SD 2.x files carry (diffusers drops it).
_OPEN_CLIP_LOGIT_SCALE = math.log(1 / 0.07)
# Anything that looks like a Hugging Face token is never written out.
_TOKEN = re.compile(r"hf_[A-Za-z0-9]{16,}")


class ExportError(ModelFileError):
    """The model folder cannot be exported; the message says why and what to do."""


@dataclass
class ExportReport:
    """What :func:`export_single_file` wrote."""

    path: Path
    version: str  # "sd1", "sd2" or "sdxl"
    prediction_type: str
    dtype: str
    ema: bool
    tensors: int
    size: int  # bytes on disk

    def __str__(self) -> str:
        kind = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}[self.version]
        return (f"{self.path} ({self.size / 1e9:.2f} GB, {self.tensors} tensors, {kind} "
                f"{self.prediction_type}, {self.dtype}, {'EMA' if self.ema else 'plain'} UNet)")


class FolderWeights(TensorFile):
    """The weights of one diffusers part folder (``unet/``, ``vae/``, ``text_encoder/``...):
    a single file or shards with their ``.index.json``, safetensors or (older) ``.bin``."""

    def __init__(self, folder: Path):
        self.path = folder
        self.metadata = {}
        self._files: dict[str, TensorFile] = {}
        self._where: dict[str, TensorFile] = {}
        for name in self._weight_files(folder):
            file = SafetensorsFile(folder / name) if name.endswith(".safetensors") \
                else TorchFile(folder / name)
            self._files[name] = file
            for key in file.shapes:
                self._where[key] = file
        self.shapes = {k: f.shapes[k] for k, f in self._where.items()}

    @staticmethod
    def _weight_files(folder: Path) -> list[str]:
        for suffix in (".safetensors", ".bin"):
            indexes = sorted(folder.glob(f"*{suffix}.index.json"))
            if indexes:
                weight_map = json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"]
                return sorted(set(weight_map.values()))
            files = sorted(p.name for p in folder.glob(f"*{suffix}"))
            # Prefer full-precision files over variants such as ``*.fp16.safetensors``.
            plain = [f for f in files if f.count(".") == 1]
            if plain or files:
                return plain or files[:1]
        raise ExportError(f"{folder} holds no weights (.safetensors or .bin)")

    def get(self, key: str) -> torch.Tensor:
        return self._where[key].get(key)

    def release(self) -> None:
        for file in self._files.values():
            file.release()


def export_single_file(model_dir: str | Path, out_file: str | Path, *, fp16: bool = False,
                       ema: bool = False, overwrite: bool = False,
                       progress: bool = True) -> ExportReport:
    """Write the diffusers model in ``model_dir`` as one single-file model.

    The suffix of ``out_file`` picks the format (``.safetensors`` or ``.ckpt``). ``fp16`` halves
    the file; ``ema`` takes the UNet from ``unet_ema/`` (saved when training with EMA). An
    existing ``out_file`` is replaced only with ``overwrite``; the write is atomic.
    """
    model_dir = Path(model_dir).expanduser()
    out_file = Path(out_file).expanduser()
    if out_file.suffix.lower() not in FORMATS:
        raise ExportError(f"{out_file}: the output must end in .safetensors (recommended) or .ckpt")
    configs = _read_configs(model_dir, ema)
    if out_file.exists() and not overwrite:
        raise ExportError(f"{out_file} already exists: choose another name, or allow "
                          "overwriting (--overwrite)")
    if "text_encoder_2" in configs:
        version = "sdxl"
    else:  # OpenCLIP ViT-H (SD 2.x) or CLIP ViT-L (SD 1.x)
        version = "sd2" if configs["text_encoder"].get("hidden_act") == "gelu" else "sd1"
    dtype = torch.float16 if fp16 else torch.float32
    folders = [("unet", "unet_ema" if ema else "unet"), ("vae", "vae"),
               ("text_encoder", "text_encoder")]
    if version == "sdxl":
        folders.append(("text_encoder_2", "text_encoder_2"))
    weights = {name: FolderWeights(model_dir / folder) for name, folder in folders}
    if out_file.resolve().parent in {w.path.resolve() for w in weights.values()}:
        raise ExportError(f"{out_file} is inside the model's own weight folders: write it elsewhere")
    try:
        links = {
            "unet": ck.unet_links(weights["unet"].shapes, configs["unet"]),
            "vae": ck.vae_links(weights["vae"].shapes, configs["vae"]),
        }
        te = weights["text_encoder"].shapes
        if version == "sdxl":
            links["text_encoder"] = ck.clip_links(te, prefix=ck.SDXL_CLIP_PREFIX)
            links["text_encoder_2"] = ck.open_clip_links(weights["text_encoder_2"].shapes,
                                                         prefix=ck.SDXL_OPEN_CLIP_PREFIX)
        elif version == "sd2":
            links["text_encoder"] = ck.open_clip_links(te, duplicate_last_layer=True)
        else:
            links["text_encoder"] = ck.clip_links(te)
    except ck.UnmappedKeyError as exc:
        raise ExportError(f"{model_dir} is not an SD 1.x/2.x/XL model this exporter knows: "
                          f"{exc}") from exc
    specs, produce = _plan(weights, links, configs, version, dtype)
    prediction = configs["scheduler"].get("prediction_type", "epsilon")
    metadata = export_metadata(model_dir, configs, version=version, prediction_type=prediction,
                               ema=ema, dtype="fp16" if fp16 else "fp32")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = temp_file_beside(out_file)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if out_file.suffix.lower() == ".safetensors":
            _write_safetensors(tmp, specs, produce, metadata, progress)
        else:
            _write_ckpt(tmp, specs, produce, metadata, model_dir)
        os.replace(tmp, out_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        for w in weights.values():
            w.release()
    report = ExportReport(out_file, version, prediction, "fp16" if fp16 else "fp32", ema,
                          len(specs), out_file.stat().st_size)
    log.info("Exported %s", report)
    return report


def _read_configs(model_dir: Path, ema: bool) -> dict[str, dict[str, Any]]:
    if not model_dir.is_dir():
        raise ExportError(f"model folder {model_dir} not found")
    files = {"unet": "unet_ema/config.json" if ema else "unet/config.json",
             "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
             "scheduler": "scheduler/scheduler_config.json"}
    if (model_dir / "text_encoder_2").is_dir():  # SDXL
        files["text_encoder_2"] = "text_encoder_2/config.json"
    if ema and not (model_dir / "unet_ema").is_dir():
        raise ExportError(f"{model_dir} has no EMA weights (unet_ema/): it was trained without "
                          "Train EMA; export without --ema")
    missing = [name for name in files.values() if not (model_dir / name).is_file()]
    if missing:
        raise ExportError(f"{model_dir} is not a complete diffusers Stable Diffusion folder: "
                          f"missing {', '.join(missing)}")
    configs = {}
    for part, name in files.items():
        try:
            configs[part] = json.loads((model_dir / name).read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ExportError(f"{model_dir / name} is not valid JSON: {exc}") from exc
    return configs


def _plan(weights: dict[str, FolderWeights], links: dict[str, list[ck.KeyLink]],
          configs: dict[str, dict], version: str, dtype: torch.dtype
          ) -> tuple[list[TensorSpec], Callable[[TensorSpec], torch.Tensor]]:
    """What to write (names, shapes) and how to make each tensor from the folder's weights."""
    specs: list[TensorSpec] = []
    makers: dict[str, Callable[[], torch.Tensor]] = {}
    for part, part_links in links.items():
        source = weights[part]
        for link in part_links:
            shapes = [source.shapes[k] for k in link.diffusers]
            shape = shapes[0]
            if link.fused:
                shape = (sum(s[0] for s in shapes),) + tuple(shape[1:])
            if link.transpose:
                shape = tuple(reversed(shape))
            if link.conv1x1 and len(shape) == 2:
                shape = tuple(shape) + (1, 1)
            specs.append(TensorSpec(link.ldm, tuple(shape), dtype))
            makers[link.ldm] = _maker(source, link, tuple(shape))
    positions = configs["text_encoder"].get("max_position_embeddings", 77)
    if version == "sd2":
        width = configs["text_encoder"]["hidden_size"]
        # Not used by SD 2.x (diffusers drops them), but tools expecting OpenCLIP's full
        # layout look for them; shape [width, width] is also what diffusers' loader reads.
        extras = {ck.OPEN_CLIP_PREFIX + "text_projection": lambda: torch.eye(width),
                  ck.OPEN_CLIP_PREFIX + "logit_scale":
                      lambda: torch.tensor(_OPEN_CLIP_LOGIT_SCALE)}
    else:
        # What SD 1.x and SDXL files carry beside their weights (SDXL's projection is a
        # weight of text_encoder_2, linked above).
        prefix = ck.SDXL_CLIP_PREFIX if version == "sdxl" else ck.CLIP_PREFIX
        extras = {prefix + "embeddings.position_ids":
                  lambda: torch.arange(positions, dtype=torch.int64)[None]}
        if version == "sdxl":
            extras[ck.SDXL_OPEN_CLIP_PREFIX + "logit_scale"] = \
                lambda: torch.tensor(_OPEN_CLIP_LOGIT_SCALE)
    for name, make in extras.items():
        tensor = make()
        spec_dtype = dtype if tensor.dtype.is_floating_point else tensor.dtype
        specs.append(TensorSpec(name, tuple(tensor.shape), spec_dtype))
        makers[name] = make
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ExportError("two weights map to the same name in the single-file layout")

    read = 0

    def produce(spec: TensorSpec) -> torch.Tensor:
        nonlocal read
        if read > RELEASE_EVERY:  # unmap what was read so far: resident memory stays small
            for source in weights.values():
                source.release()
            read = 0
        tensor = makers[spec.name]()
        read += tensor.numel() * tensor.element_size()
        return tensor.to(spec.dtype)

    return specs, produce


def _maker(source: FolderWeights, link: ck.KeyLink, shape: tuple[int, ...]
           ) -> Callable[[], torch.Tensor]:
    def make() -> torch.Tensor:
        parts = [source.get(k) for k in link.diffusers]
        tensor = torch.cat(parts) if link.fused else parts[0]
        if link.transpose:
            tensor = tensor.t().contiguous()
        return tensor.reshape(shape)

    return make


def _write_safetensors(path: Path, specs: list[TensorSpec],
                       produce: Callable[[TensorSpec], torch.Tensor], metadata: dict[str, str],
                       progress: bool) -> None:
    from tqdm.auto import tqdm

    with tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True, desc="Exporting",
              disable=not progress) as bar:
        write_safetensors(path, specs, produce, metadata, bar.update)


def _write_ckpt(path: Path, specs: list[TensorSpec],
                produce: Callable[[TensorSpec], torch.Tensor], metadata: dict[str, str],
                model_dir: Path) -> None:
    state = {}
    for spec in specs:
        tensor = produce(spec)
        # A view into a larger buffer would make torch.save write the whole buffer.
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        state[spec.name] = tensor
    checkpoint: dict[str, Any] = {"state_dict": state, "metadata": metadata}
    steps = metadata.get("colab_dreambooth.steps", "")
    if steps.isdigit():
        checkpoint["global_step"] = int(steps)
    torch.save(checkpoint, path)


def export_metadata(model_dir: Path, configs: dict[str, dict], *, version: str,
                    prediction_type: str, ema: bool, dtype: str) -> dict[str, str]:
    """The header of the exported file: modelspec fields, training facts from the folder's
    ``training_info.json``/``params.json``, and the diffusers configs; all strings, no token."""
    info = _read_json(model_dir / "training_info.json")
    params = _read_json(model_dir / "params.json")
    v = prediction_type == "v_prediction"
    architecture = architecture_names(version, v)[1]
    resolution = params.get("resolution") or configs["vae"].get("sample_size") or 512
    concepts = params.get("concepts_list") if isinstance(params.get("concepts_list"), list) else []
    prompts = info.get("instance_prompts") or [c.get("instance_prompt", "") for c in concepts
                                               if isinstance(c, dict)]
    meta: dict[str, Any] = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": model_dir.parent.name if model_dir.name == "model" else model_dir.name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if v else "epsilon",
        "modelspec.date": info.get("saved_at") or time.strftime("%Y-%m-%dT%H:%M:%S"),
        "colab_dreambooth.base_model": info.get("base_model")
        or params.get("pretrained_model_name_or_path"),
        "colab_dreambooth.instance_prompts": json.dumps(prompts) if prompts else None,
        "colab_dreambooth.steps": info.get("steps"),
        "colab_dreambooth.epochs": info.get("epochs"),
        "colab_dreambooth.seed": info.get("seed"),
        "colab_dreambooth.resolution": params.get("resolution"),
        "colab_dreambooth.unet_weights": "ema" if ema else "plain",
        "colab_dreambooth.dtype": dtype,
    }
    for part, key in CONFIG_METADATA_KEYS.items():
        if part in configs:  # text_encoder_2: SDXL only
            meta[key] = json.dumps(configs[part], sort_keys=True)
    return {k: _TOKEN.sub("<redacted>", str(v)) for k, v in meta.items()
            if v is not None and v != ""}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


__all__ = ["export_single_file", "export_metadata", "ExportReport", "ExportError",
           "FolderWeights", "FORMATS"]
