"""Loading the base model's parts from a Hub id, a diffusers folder, a single file or ``tiny``.

:func:`load_components` takes a Hub id, a local diffusers folder, a single ``.safetensors``/
``.ckpt`` file, or ``tiny`` (:mod:`colab_dreambooth.models.tiny`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colab_dreambooth.config.settings import TINY_MODEL, TINY_SDXL_MODEL
from colab_dreambooth.config.validation import looks_like_local_path
from colab_dreambooth.console import quiet_known_warnings
from colab_dreambooth.errors import ModelLoadError
from colab_dreambooth.models.families import FAMILY, SD, folder_family
from colab_dreambooth.models.single_file.convert import convert_single_file
from colab_dreambooth.models.text_encoding import DualTextEncoder
from colab_dreambooth.models.tiny import tiny_model_path, tiny_sdxl_model_path

log = logging.getLogger(__name__)
quiet_known_warnings()  # e.g. transformers' "requires torchvision" on every model load



@dataclass
class Components:
    """The parts of a Stable Diffusion (1.x, 2.x or XL) model that training touches."""

    tokenizer: Any
    text_encoder: Any  # SDXL: both encoders as one DualTextEncoder
    vae: Any
    unet: Any
    noise_scheduler: Any  # DDPM, for adding noise during training
    inference_scheduler: Any  # the model's own sampling scheduler, saved with the result
    source: str  # the local folder it was read from
    tokenizer_2: Any = None  # SDXL's second tokenizer
    family: str = SD  # colab_dreambooth.models.families.SD or SDXL
    vae_folder: str | None = None  # the VAE's diffusers folder (None: not a folder on disk)

    @property
    def tokenizers(self) -> tuple:
        """The tokenizer of each text encoder, in order."""
        return (self.tokenizer,) if self.tokenizer_2 is None else (self.tokenizer,
                                                                   self.tokenizer_2)

    @property
    def prediction_type(self) -> str:
        """``epsilon`` or ``v_prediction`` (SD 2.x 768 models), from the scheduler config."""
        return self.noise_scheduler.config.prediction_type


def load_components(name: str, vae: str = "") -> Components:
    """Load tokenizer(s), text encoder(s), VAE, UNet and schedulers of a base model.

    ``name`` is ``tiny``, ``tiny-sdxl``, a local diffusers folder, a ``.safetensors``/``.ckpt``
    single file, or a Hugging Face Hub id (downloaded once into the Hub cache). The family
    (SD 1.x/2.x or SDXL) is read from the folder. ``vae`` (the VAE field) replaces the model's
    VAE: see :func:`load_vae`.
    """
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    folder = resolve_model_folder(name)
    family = FAMILY[folder_family(folder)]
    try:
        tokenizers, encoders = [], []
        for subfolder, tokenizer_folder, class_name, _ in family.text_encoders:
            tokenizers.append(transformers.CLIPTokenizer.from_pretrained(
                folder, subfolder=tokenizer_folder))
            encoders.append(getattr(transformers, class_name).from_pretrained(
                folder, subfolder=subfolder))
        # SDXL's two encoders as one module: the loop handles them as SD's one.
        text_encoder = encoders[0] if len(encoders) == 1 else DualTextEncoder(*encoders)
        vae_folder = str(folder / "vae")
        if vae.strip():
            vae_module, vae_folder = load_vae(vae, folder)
        else:
            vae_module = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        scheduler_config = _read_scheduler_config(folder)
    except (OSError, ValueError) as exc:
        parts = ", ".join([t for e in family.text_encoders for t in e[1::-1]]
                          + ["vae", "unet", "scheduler"])
        raise ModelLoadError(f"{folder} is not a complete {family.label} diffusers folder "
                             f"({parts}): {exc}") from exc
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    inference_scheduler = _scheduler_class(scheduler_config).from_config(scheduler_config)
    return Components(tokenizers[0], text_encoder, vae_module, unet, noise_scheduler,
                      inference_scheduler, str(folder),
                      tokenizers[1] if len(tokenizers) > 1 else None, family.name, vae_folder)


def load_vae(name: str, base_folder: str | Path) -> tuple[Any, str | None]:
    """Another VAE for a model: a Hub id (e.g. ``madebyollin/sdxl-vae-fp16-fix``), a diffusers
    VAE folder (or a model folder, whose ``vae/`` is taken) or a single-file ``.safetensors``/
    ``.ckpt`` VAE (in the original layout; read with the base model's VAE config, offline).
    Returns the VAE and its diffusers folder (None for a single file)."""
    from diffusers import AutoencoderKL

    name = name.strip()
    path = Path(name).expanduser()
    try:
        if path.is_file():
            if path.suffix.lower() not in (".safetensors", ".ckpt", ".pt"):
                raise ModelLoadError(f"the VAE {path} is neither a diffusers folder nor a "
                                     ".safetensors/.ckpt file")
            vae = AutoencoderKL.from_single_file(str(path), config=str(Path(base_folder)),
                                                 subfolder="vae", local_files_only=True)
            return vae, None
        if path.is_dir():
            folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
            return AutoencoderKL.from_pretrained(folder), str(folder)
        if looks_like_local_path(name):
            raise ModelLoadError(f"the VAE {name} does not exist ({path.absolute()})")
        from huggingface_hub import snapshot_download

        # Only the diffusers weights: VAE repos often hold single-file copies beside them.
        weights = ["config.json", "diffusion_pytorch_model.safetensors"]
        folder = Path(snapshot_download(name, allow_patterns=weights + [f"vae/{w}"
                                                                         for w in weights]))
        if (folder / "vae" / "config.json").is_file():
            folder = folder / "vae"
        return AutoencoderKL.from_pretrained(folder), str(folder)
    except ModelLoadError:
        raise
    except Exception as exc:  # the Hub client and the loaders raise many types
        raise ModelLoadError(f"could not load the VAE {name} ({type(exc).__name__}: {exc}): "
                             "give a Hub id, a diffusers VAE folder or a .safetensors VAE, or "
                             "leave VAE blank for the base model's own") from exc


def dtype_argument(dtype: Any) -> dict[str, Any]:
    """The keyword that sets a diffusers ``from_pretrained``'s dtype on the installed diffusers:
    ``dtype`` from 0.40, ``torch_dtype`` before (0.39, Colab's, ignores ``dtype`` and loads
    fp32: twice the memory of fp16, too much for a T4 with Stable Diffusion)."""
    from importlib.metadata import version

    from packaging.version import Version

    new = Version(version("diffusers")) >= Version("0.40")
    return {"dtype" if new else "torch_dtype": dtype}


def resolve_model_folder(name: str) -> Path:
    """A local diffusers folder for ``name``, building, converting or downloading as needed."""
    name = name.strip()
    if name == TINY_MODEL:
        return tiny_model_path()
    if name == TINY_SDXL_MODEL:
        return tiny_sdxl_model_path()
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.suffix.lower() in (".safetensors", ".ckpt"):
        if not path.is_file():
            raise ModelLoadError(f"model file {path} not found")
        return _convert_single_file(path)
    if path.exists():
        raise ModelLoadError(f"{name} is neither a diffusers folder nor a .safetensors/.ckpt "
                             "file")

    if looks_like_local_path(name):
        # "models/dreambooth/x/modle", "./base", "~/sd": a local path that is not there, not
        # a Hub id (and never a network error about an id nobody meant).
        raise ModelLoadError(f"the model folder {name} does not exist ({path.absolute()}): "
                             "check the path, or give a Hub id (owner/name), a "
                             ".safetensors/.ckpt file or 'tiny'")
    return _download(name)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "scheduler/*", "tokenizer/*", "text_encoder/*", "vae/*",
                "unet/*", "tokenizer_2/*", "text_encoder_2/*"]  # the last two: SDXL
    try:
        # Only the safetensors weights: the .bin/.ckpt copies would double the download.
        return Path(snapshot_download(repo_id, allow_patterns=patterns,
                                      ignore_patterns=["*.bin", "*.ckpt", "*.msgpack", "*.onnx*",
                                                       "*non_ema*", "*.fp16.*"]))
    except Exception as exc:  # the Hub client raises many types; all mean "could not get it"
        raise ModelLoadError(
            f"could not download '{repo_id}' from the Hugging Face Hub ({type(exc).__name__}: "
            f"{exc}). Check the id and your network; a gated model needs a login "
            f"(HF_TOKEN). No local folder {repo_id} exists in {Path.cwd()} either. Or point "
            "the base model at a local diffusers folder or .safetensors file, or use 'tiny' "
            "to try the package offline.") from exc


def _convert_single_file(path: Path) -> Path:
    """Convert a single-file checkpoint into a diffusers folder beside it (once), offline."""
    target = path.with_name(path.stem + "-diffusers")
    if (target / "model_index.json").is_file():
        return target

    log.info("Converting %s to the diffusers layout in %s", path, target)
    convert_single_file(path, target)  # its ModelFileError is a ModelLoadError
    return target


def _read_scheduler_config(folder: Path) -> dict:
    with open(folder / "scheduler" / "scheduler_config.json", encoding="utf-8") as f:
        return json.load(f)


def _scheduler_class(config: dict):
    import diffusers

    return getattr(diffusers, config.get("_class_name", ""), diffusers.PNDMScheduler)
