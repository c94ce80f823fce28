"""Create Model: a single-file ``.safetensors``/``.ckpt`` checkpoint becomes a diffusers folder.

Works offline: the diffusers configs of SD 1.x, SD 2.x base (512, epsilon) and SD 2.x 768
(v-prediction) ship in ``configs/``, and whatever the weights' shapes say (widths, layers,
cross-attention size) overrides them, so SD-shaped models of any size convert too.

Built for Colab's 12.7 GB of host memory: the source stays memory-mapped and its mapping is
dropped every few hundred MB; each weight is renamed, converted and streamed straight into a
sharded ``.safetensors`` file, so only one tensor at a time is ever copied into memory.

How the prediction type is chosen (it cannot be read from the weights): the caller's
``v_prediction``, else the file's metadata (the scheduler config our exporter embeds,
``modelspec.prediction_type``, kohya's ``ss_v_parameterization``), else a ``.yaml`` beside
the file with ``parameterization: "v"`` (AUTOMATIC1111's convention), else the rule diffusers
uses: SD 1.x is epsilon; SD 2.x is the 768-px v-prediction model unless the checkpoint's
``global_step`` is 875000 (SD 2.x base, 512 px, epsilon).
"""

from __future__ import annotations

import abc
import json
import logging
import math
import re
from dataclasses import dataclass, field
from functools import reduce
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from colab_dreambooth.errors import ModelLoadError
from colab_dreambooth.files import save_folder_atomic
from colab_dreambooth.models.single_file import ldm_keys as ck
from colab_dreambooth.models.tiny import clip_tokenizer
from colab_dreambooth.tensor_stream import TensorSpec, write_sharded

log = logging.getLogger(__name__)

VARIANTS = ("sd1", "sd2", "sd2-v")
DEFAULT_SHARD_SIZE = 1 << 30  # 1 GiB: what diffusers itself uses for large models' shards
# Drop the source's memory mapping after this much reading, so resident memory stays small.
RELEASE_EVERY = 256 << 20
# safetensors metadata keys under which our exporter embeds each part's diffusers config.
CONFIG_METADATA_KEYS = {"unet": "colab_dreambooth.unet_config",
                        "vae": "colab_dreambooth.vae_config",
                        "text_encoder": "colab_dreambooth.text_encoder_config",
                        "scheduler": "colab_dreambooth.scheduler_config"}
SD2_BASE_GLOBAL_STEP = 875000  # SD 2.0/2.1-base checkpoints; diffusers' convert_from_ckpt rule


class CheckpointError(ModelLoadError):
    """A checkpoint file cannot be converted; the message names the file and what is wrong."""


@dataclass
class ConversionReport:
    """What :func:`convert_single_file` made."""

    folder: Path
    version: str  # "sd1" or "sd2"
    prediction_type: str  # "epsilon" or "v_prediction"
    prediction_source: str  # why that prediction type
    dtype: str
    ema: bool
    configs_from: str  # "file metadata" or "shipped configs + weight shapes"
    ignored_keys: int = 0
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        kind = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x"}[self.version]
        return (f"{kind} ({self.prediction_type}, {self.prediction_source}), {self.dtype}"
                f"{', EMA UNet' if self.ema else ''} -> {self.folder}")


# =================================================================================== reading
class TensorFile(abc.ABC):
    """A checkpoint's tensors by name, read lazily; :meth:`release` drops the memory mapping."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]
    global_step: int | None = None

    @abc.abstractmethod
    def get(self, key: str) -> torch.Tensor:
        """The tensor named ``key``."""

    def release(self) -> None:
        """Forget mapped pages; the next :meth:`get` maps the file again."""


class SafetensorsFile(TensorFile):
    """A ``.safetensors`` file, memory-mapped through ``safetensors.safe_open``."""

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path = path
        self._open = lambda: safe_open(str(path), framework="pt", device="cpu")
        try:
            handle = self._open()
            self.shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
            self.metadata = dict(handle.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable .safetensors file ({exc}); it may "
                                  "be corrupt or an incomplete download: download it again") from exc
        self._handle = handle

    def get(self, key: str) -> torch.Tensor:
        if self._handle is None:
            self._handle = self._open()
        return self._handle.get_tensor(key)

    def release(self) -> None:
        self._handle = None


class _Ignored:
    """Stands in for training-state objects (Lightning callbacks, numpy scalars) that some
    ``.ckpt`` files carry beside their weights: it keeps nothing and runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        pass


# Globals found in real SD training checkpoints outside ``state_dict``, all replaced by
# _Ignored (never imported or called), so the weights-only loader accepts such files.
_TRAINING_STATE_GLOBALS = [
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype",
]


class TorchFile(TensorFile):
    """A ``.ckpt``/``.pt`` file: ``torch.load(weights_only=True, mmap=True)``, ``state_dict``
    unwrapped. Re-loading after :meth:`release` costs only the unpickling of the names."""

    def __init__(self, path: Path):
        self.path = path
        self._mmap = True
        top = self._load()
        state = _unwrap_state_dict(top)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} holds no state dict of weights")
        self.shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
        meta = top.get("metadata") if isinstance(top, dict) else None
        self.metadata = ({str(k): str(v) for k, v in meta.items()}
                         if isinstance(meta, dict) else {})
        step = top.get("global_step") if isinstance(top, dict) else None
        self.global_step = int(step) if isinstance(step, (int, float)) else None
        # A file that cannot be memory-mapped was read whole: keep it rather than re-read it.
        self._state = state if not self._mmap else None

    def _load(self) -> Any:
        stand_ins = [(_Ignored, name) for name in _TRAINING_STATE_GLOBALS]
        try:
            with torch.serialization.safe_globals(stand_ins):
                try:
                    return torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:
                    if "mmap" not in str(exc) or not self._is_pickle():
                        raise
                    # Legacy (pre-zip) format: cannot be mapped, so it is read whole.
                    log.warning("%s is in the legacy .ckpt format: reading it whole into memory",
                                self.path)
                    self._mmap = False
                    return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
            raise CheckpointError(_torch_load_problem(self.path, exc)) from exc

    def _is_pickle(self) -> bool:
        with open(self.path, "rb") as f:
            return f.read(1) == b"\x80"  # the PROTO opcode that starts every binary pickle

    def get(self, key: str) -> torch.Tensor:
        if self._state is None:
            self._state = _unwrap_state_dict(self._load())
        return self._state[key]

    def release(self) -> None:
        if self._mmap:
            self._state = None


def _unwrap_state_dict(top: Any) -> Any:
    while isinstance(top, dict) and isinstance(top.get("state_dict"), dict):
        top = top["state_dict"]
    return top


def _torch_load_problem(path: Path, exc: Exception) -> str:
    text = str(exc).strip()
    if re.search(r"Unsupported (global|class)", text):
        found = re.findall(r"GLOBAL ([\w.]+)", text)
        return (f"{path} holds Python objects other than weights ({', '.join(found) or text}); "
                "it is not loaded with pickle for safety. Convert it to .safetensors with a tool "
                "you trust, or re-save only its state_dict")
    # torch's own advice (weights_only=False, re-save with zip) does not apply to a bad file.
    generic = not text or text.startswith("Weights only load failed") or "mmap" in text
    detail = "" if generic else f" ({text.split('. ')[0][:200]})"
    return (f"{path} could not be read as a PyTorch checkpoint{detail}: it is corrupt, "
            "truncated (an incomplete download?) or not a checkpoint")


def open_checkpoint(path: str | Path) -> TensorFile:
    """Open a single-file checkpoint by its content (a ``.ckpt`` that is really safetensors
    works too); raise :class:`CheckpointError` naming the file when it is unreadable."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} not found")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        raise CheckpointError(f"{path} is empty or truncated ({path.stat().st_size} bytes)")
    # safetensors: an 8-byte little-endian header size, then the JSON header.
    if head[8:9] == b"{" or path.suffix.lower() == ".safetensors" and not head.startswith(b"PK"):
        return SafetensorsFile(path)
    return TorchFile(path)  # a zip (torch.save) or a legacy pickle




# ============================================================================= configs
def load_model_config(variant: str) -> dict[str, Any]:
    """The shipped diffusers configs of ``sd1``, ``sd2`` (base, 512, epsilon) or ``sd2-v``
    (768, v-prediction): a dict with ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and
    ``scheduler`` sections."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    text = (resources.files(__package__) / "configs" / f"{variant}.json").read_text("utf-8")
    return json.loads(text)


def write_config_folder(configs: dict[str, Any], folder: str | Path,
                        dtype: torch.dtype = torch.float32) -> Path:
    """Write a diffusers folder without weights: ``model_index.json``, the four configs and the
    tokenizer. ``configs`` is :func:`load_model_config`'s dict (or one made like it). Also what
    ``from_single_file(path, config=folder)`` needs to work offline."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        UNet2DConditionModel.from_config(_plain(configs["unet"])).save_config(folder / "unet")
        AutoencoderKL.from_config(_plain(configs["vae"])).save_config(folder / "vae")
    text_config = CLIPTextConfig(**_plain(configs["text_encoder"]))
    text_config.architectures = ["CLIPTextModel"]
    text_config.dtype = str(dtype).removeprefix("torch.")
    text_config.save_pretrained(folder / "text_encoder")
    scheduler_config = dict(configs["scheduler"])
    scheduler_cls = getattr(diffusers, scheduler_config.get("_class_name", ""),
                            diffusers.PNDMScheduler)
    scheduler_cls.from_config(_plain(scheduler_config)).save_config(folder / "scheduler")
    tokenizer = clip_tokenizer()
    pad = configs.get("tokenizer", {}).get("pad_token")
    if pad and pad != tokenizer.pad_token:
        tokenizer.pad_token = pad  # SD 2.x pads with "!", same BPE otherwise
    tokenizer.save_pretrained(folder / "tokenizer")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "requires_safety_checker": False, "safety_checker": [None, None],
             "scheduler": ["diffusers", scheduler_cls.__name__],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return folder


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    """A config without bookkeeping keys (``_class_name``, ``_diffusers_version``, ...)."""
    return {k: v for k, v in config.items()
            if not k.startswith("_") and k not in ("architectures", "transformers_version",
                                                   "dtype", "torch_dtype")}


def _sub(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


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


def unet_config_from_weights(shapes: dict[str, tuple[int, ...]], base: dict[str, Any]) -> dict:
    """The UNet's diffusers config from its LDM weight shapes (names without the prefix)."""
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
    depth = _indices(keys, r"input_blocks\.%d\.1\.transformer_blocks\.(\d+)\." %
                     first[down.index("CrossAttnDownBlock2D")]) if "CrossAttnDownBlock2D" in down else [0]
    derived = {
        "in_channels": _dim(shapes, "input_blocks.0.0.weight", 1, base["in_channels"]),
        "out_channels": _dim(shapes, "out.2.weight", 0, base["out_channels"]),
        "block_out_channels": widths,
        "layers_per_block": layers,
        "down_block_types": down,
        "up_block_types": up,
        "cross_attention_dim": shapes[attn[0]][1] if attn else base["cross_attention_dim"],
        "use_linear_projection": bool(proj) and len(proj[0]) == 2,
        "transformer_layers_per_block": len(depth),
    }
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
                             open_clip: bool) -> dict:
    """The text encoder's ``CLIPTextConfig`` from its LDM weight shapes (names without the
    prefix). OpenCLIP files hold one block more than diffusers keeps (see module docs)."""
    if open_clip:
        vocab, hidden = shapes["token_embedding.weight"]
        positions = _dim(shapes, "positional_embedding", 0, base["max_position_embeddings"])
        blocks = _indices(shapes, r"transformer\.resblocks\.(\d+)\.")
        intermediate = _dim(shapes, "transformer.resblocks.0.mlp.c_fc.weight", 0,
                            base["intermediate_size"])
        # SD 2.x runs the penultimate block; real files (and our exports) hold one more, with
        # OpenCLIP's text_projection. Without it the file already ends at the used block.
        layers = len(blocks) - (1 if "text_projection" in shapes else 0)
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
    return config


# ======================================================================== the conversion
@dataclass
class _Part:
    """One model of the pipeline: its diffusers config and where each weight comes from."""

    name: str  # "unet", "vae", "text_encoder"
    config: dict[str, Any]
    specs: list[TensorSpec]  # in the diffusers model's own order
    sources: dict[str, tuple[str, int | None]]  # diffusers key -> (file key, part of 3 or None)
    known: set[str]  # the layout's names of these weights (the plain ones when reading EMA)


def convert_single_file(path: str | Path, out_dir: str | Path, *, v_prediction: bool | None = None,
                        fp16: bool = False, ema: bool = False, overwrite: bool = False,
                        max_shard_size: int = DEFAULT_SHARD_SIZE,
                        progress: bool = True) -> ConversionReport:
    """Convert an SD 1.x/2.x single-file checkpoint into a diffusers folder at ``out_dir``.

    ``v_prediction``: True/False to say what the model predicts, None to detect it (see the
    module docs). ``fp16`` writes half-precision weights (default fp32, exact for any source).
    ``ema`` takes the UNet's EMA copy when the file holds one (``model_ema.*``). An existing
    ``out_dir`` is replaced only when empty or with ``overwrite``; it is written atomically.
    Raises :class:`CheckpointError` for unreadable, incomplete or non-SD files.
    """
    path = Path(path).expanduser()
    out_dir = Path(out_dir).expanduser()
    _check_target(path, out_dir, overwrite)
    source = open_checkpoint(path)
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
        raise CheckpointError(f"output {out_dir} exists and is not a folder")
    if out_dir.resolve() in path.resolve().parents:
        raise CheckpointError(f"output folder {out_dir} holds the checkpoint {path}: choose "
                              "another folder (it would be replaced)")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"output folder {out_dir} already exists and is not empty: choose "
                              "another folder, or allow overwriting (--overwrite)")


def _plan(source: TensorFile, *, v_prediction: bool | None, ema: bool
          ) -> tuple[ConversionReport, list[_Part], dict[str, Any]]:
    """Detect the model, choose its configs and map every weight; raise on missing keys."""
    keys = source.shapes.keys()
    _check_is_sd(source)
    open_clip = any(k.startswith(ck.OPEN_CLIP_PREFIX) for k in keys)
    clip_prefix = (ck.CLIP_PREFIX if any(k.startswith(ck.CLIP_PREFIX) for k in keys)
                   else ck.CLIP_PREFIX_SHORT)
    version = "sd2" if open_clip else "sd1"
    prediction, why = _prediction_type(source, version, v_prediction)
    variant = "sd2-v" if version == "sd2" and prediction == "v_prediction" else version
    base = load_model_config(variant)
    notes: list[str] = []

    has_ema = any(k.startswith(ck.EMA_PREFIX + "diffusion_model") for k in keys)
    use_ema = ema and has_ema
    if ema and not has_ema:
        notes.append("the file holds no EMA weights (model_ema.*): used the plain UNet")
    elif has_ema and not ema:
        notes.append("the file also holds EMA weights (model_ema.*); pass ema=True (--ema) to "
                     "use them instead")

    unet_shapes = _sub(source.shapes, ck.UNET_PREFIX)
    text_prefix = ck.OPEN_CLIP_PREFIX if open_clip else clip_prefix
    try:
        derived = {
            "unet": unet_config_from_weights(unet_shapes, base["unet"]),
            "vae": vae_config_from_weights(_sub(source.shapes, ck.VAE_PREFIX), base["vae"]),
            "text_encoder": text_config_from_weights(_sub(source.shapes, text_prefix),
                                                     base["text_encoder"], open_clip),
        }
    except (KeyError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{source.path} does not have the layout of a Stable Diffusion "
                              f"1.x/2.x checkpoint ({type(exc).__name__}: {exc})") from exc
    channels = derived["unet"]["in_channels"]
    if channels != derived["vae"]["latent_channels"]:
        kind = {9: "an inpainting model", 8: "an instruct-pix2pix model", 5: "a depth model"}.get(
            channels, "not a text-to-image model")
        raise CheckpointError(f"{source.path}: its UNet takes {channels} input channels, "
                              f"{kind}; only text-to-image models (4 channels) are supported")
    text_width = derived["text_encoder"]["hidden_size"]
    if derived["unet"]["cross_attention_dim"] != text_width:
        raise CheckpointError(
            f"{source.path}: its UNet expects {derived['unet']['cross_attention_dim']}-wide text "
            f"features but its text encoder makes {text_width}: not a consistent SD 1.x/2.x model")
    embedded = _embedded_configs(source.metadata, derived)
    configs = {**base, **derived, **embedded}
    configs["scheduler"] = {**configs["scheduler"], "prediction_type": prediction}
    if embedded:
        notes.append(f"used the configs stored in the file for: {', '.join(sorted(embedded))}")

    def unet_source(key: str) -> str:
        return ck.ema_name(key) if use_ema else key

    def text_source(key: str) -> str:
        return key.replace(ck.CLIP_PREFIX, clip_prefix, 1)

    parts = [
        _map_part(source, "text_encoder", configs["text_encoder"], text_source, open_clip),
        _map_part(source, "vae", configs["vae"], lambda k: k, open_clip),
        _map_part(source, "unet", configs["unet"], unet_source, open_clip),
    ]
    missing = [key for part in parts for key, _ in part.sources.values() if key not in source.shapes]
    if missing:
        missing = sorted(set(missing))
        raise CheckpointError(
            f"{source.path} is missing {len(missing)} weight(s) of a Stable Diffusion "
            f"{version[-1]}.x model, e.g. {', '.join(missing[:5])}: the file is incomplete or "
            "not such a checkpoint (a LoRA, a VAE or a UNet alone?)")
    _check_shapes(source, parts)
    used = set().union(*(part.known for part in parts))
    unused_ok = [ck.OPEN_CLIP_PREFIX + "transformer.resblocks."
                 f"{configs['text_encoder']['num_hidden_layers']}."] if open_clip else []
    stray = [k for k in keys if k.startswith((ck.UNET_PREFIX, ck.VAE_PREFIX, text_prefix))
             and k not in used and not _ignorable(k, unused_ok)]
    if stray:
        raise CheckpointError(
            f"{source.path} has {len(stray)} weight(s) that an SD {version[-1]}.x text-to-image "
            f"model does not have, e.g. {', '.join(stray[:5])}: this kind of model "
            "(inpainting/upscaler/depth/ControlNet?) is not supported")
    report = ConversionReport(
        folder=Path(), version=version, prediction_type=prediction, prediction_source=why,
        dtype="", ema=use_ema,
        configs_from="file metadata" if embedded else "shipped configs + weight shapes",
        ignored_keys=len(set(keys) - {k for p in parts for k, _ in p.sources.values()}),
        notes=notes)
    for note in notes:
        log.info("%s: %s", source.path.name, note)
    return report, parts, configs


def _check_is_sd(source: TensorFile) -> None:
    keys = list(source.shapes)
    path = source.path
    if not keys:
        raise CheckpointError(f"{path} holds no weights")
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise CheckpointError(f"{path} is an SDXL checkpoint (conditioner.embedders.*); only "
                              "Stable Diffusion 1.x and 2.x are supported")
    if not any(k.startswith(ck.UNET_PREFIX) for k in keys):
        hint = ""
        if any("lora" in k.lower() for k in keys[:50]):
            hint = " It looks like a LoRA: load it on top of a base model instead."
        elif any(k.startswith(("down_blocks.", "encoder.", "text_model.", "encoder.layers."))
                 for k in keys):
            hint = " It looks like a single diffusers part (UNet, VAE or text encoder) alone."
        raise CheckpointError(f"{path} is not a Stable Diffusion checkpoint: it has no UNet "
                              f"weights under {ck.UNET_PREFIX}.{hint}")
    if not any(k.startswith((ck.CLIP_PREFIX_SHORT, ck.OPEN_CLIP_PREFIX)) for k in keys):
        raise CheckpointError(f"{path} has no text encoder weights (cond_stage_model.*): not a "
                              "complete Stable Diffusion 1.x/2.x checkpoint")
    if not any(k.startswith(ck.VAE_PREFIX) for k in keys):
        raise CheckpointError(f"{path} has no VAE weights ({ck.VAE_PREFIX}*): not a complete "
                              "Stable Diffusion checkpoint (add a VAE with a merging tool)")


def _ignorable(key: str, prefixes: Sequence[str]) -> bool:
    # Weights that SD files carry but diffusers does not use: the VAE's training loss, CLIP's
    # position ids, OpenCLIP's projection and the block after the one SD 2.x reads.
    return (key.endswith("position_ids") or key.startswith(f"{ck.VAE_PREFIX}loss.")
            or key.startswith(tuple(prefixes))
            or key in (ck.OPEN_CLIP_PREFIX + "text_projection", ck.OPEN_CLIP_PREFIX + "logit_scale"))


def _prediction_type(source: TensorFile, version: str, v_prediction: bool | None
                     ) -> tuple[str, str]:
    """``(prediction_type, why)``; see the module docstring for the order of the clues."""
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
    return "epsilon", "SD 1.x default"


def _embedded_configs(metadata: dict[str, str], derived: dict[str, dict]) -> dict[str, dict]:
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
             "down_block_types", "up_block_types", "cross_attention_dim", "use_linear_projection"),
    "vae": ("in_channels", "out_channels", "latent_channels", "block_out_channels",
            "layers_per_block"),
    "text_encoder": ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                     "max_position_embeddings"),
}


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _meta_model(name: str, config: dict[str, Any]):
    """The diffusers/transformers model of ``config`` with no memory behind its weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        if name == "unet":
            return UNet2DConditionModel.from_config(_plain(config))
        if name == "vae":
            return AutoencoderKL.from_config(_plain(config))
        return CLIPTextModel(CLIPTextConfig(**_plain(config)))


def _map_part(source: TensorFile, name: str, config: dict[str, Any],
              source_key: Callable[[str], str], open_clip: bool) -> _Part:
    state = _meta_model(name, config).state_dict()
    if name == "unet":
        links = ck.unet_links(state, config)
    elif name == "vae":
        links = ck.vae_links(state, config)
    else:
        links = ck.open_clip_links(state) if open_clip else ck.clip_links(state)
    sources: dict[str, tuple[str, int | None]] = {}
    for link in links:
        for index, key in enumerate(link.diffusers):
            sources[key] = (source_key(link.ldm), index if link.fused else None)
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in state.items() if k in sources]
    known = {link.ldm for link in links} | {key for key, _ in sources.values()}
    return _Part(name, config, specs, sources, known)


def _check_shapes(source: TensorFile, parts: list[_Part]) -> None:
    wrong = []
    for part in parts:
        for spec in part.specs:
            key, index = part.sources[spec.name]
            shape = source.shapes[key]
            if index is not None:
                shape = (shape[0] // 3,) + tuple(shape[1:])
            if not _same_shape(shape, spec.shape):
                wrong.append(f"{key} is {list(shape)}, expected {list(spec.shape)}")
    if wrong:
        raise CheckpointError(f"{source.path}: {len(wrong)} weight(s) have unexpected shapes, "
                              f"e.g. {'; '.join(wrong[:3])}: the file is damaged or a kind of "
                              "model this converter does not support")


def _same_shape(a: Sequence[int], b: Sequence[int]) -> bool:
    # 1x1 convolutions and linear layers hold the same numbers (VAE attention, proj_in/out).
    strip = lambda s: tuple(s[:2]) if len(s) > 2 and all(d == 1 for d in s[2:]) else tuple(s)
    return strip(a) == strip(b)


def _write_weights(source: TensorFile, parts: list[_Part], folder: Path, dtype: torch.dtype,
                   max_shard_size: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    total = sum(math.prod(s.shape) for p in parts for s in p.specs) * _itemsize(dtype)
    read_since_release = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc="Converting", disable=not progress) as bar:
        for part in parts:

            def produce(spec: TensorSpec, part: _Part = part) -> torch.Tensor:
                nonlocal read_since_release
                if read_since_release > RELEASE_EVERY:
                    source.release()
                    read_since_release = 0
                key, index = part.sources[spec.name]
                tensor = source.get(key)
                read_since_release += tensor.numel() * tensor.element_size()
                if index is not None:
                    tensor = tensor.chunk(3, dim=0)[index]
                return tensor.reshape(spec.shape).to(dtype if spec.dtype.is_floating_point
                                                      else spec.dtype)

            specs = [TensorSpec(s.name, s.shape, dtype if s.dtype.is_floating_point else s.dtype)
                     for s in part.specs]
            stem = "model" if part.name == "text_encoder" else "diffusion_pytorch_model"
            write_sharded(folder / part.name, stem, specs, produce, max_shard_size, bar.update)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


__all__ = ["convert_single_file", "ConversionReport", "CheckpointError", "open_checkpoint",
           "TensorFile", "SafetensorsFile", "TorchFile", "load_model_config", "write_config_folder",
           "unet_config_from_weights",
           "vae_config_from_weights", "text_config_from_weights", "CONFIG_METADATA_KEYS", "VARIANTS"]
