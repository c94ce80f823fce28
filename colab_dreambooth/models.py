"""Loading the base model's parts, and the tiny Stable-Diffusion-shaped model for tests and demos.

:func:`load_components` takes a Hub id, a local diffusers folder, a single ``.safetensors``/
``.ckpt`` file, or ``tiny``. The tiny model keeps SD 1.x's exact topology with tiny widths and
random weights (seeded, so it is the same everywhere), and a real CLIP tokenizer built offline
from the BPE merges shipped in the ``open-clip-torch`` wheel.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .config import TINY_MODEL
from .console import quiet_known_warnings
from .errors import UserError
from .files import give_ordinary_permissions, temp_folder_beside

log = logging.getLogger(__name__)
quiet_known_warnings()  # e.g. transformers' "requires torchvision" on every model load

TINY_VERSION = "1"


class ModelLoadError(UserError, RuntimeError):
    """The base model could not be loaded; the message says why and what to do."""


@dataclass
class Components:
    """The parts of a Stable Diffusion model that training touches."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any  # DDPM, for adding noise during training
    inference_scheduler: Any  # the model's own sampling scheduler, saved with the result
    source: str  # the local folder it was read from

    @property
    def prediction_type(self) -> str:
        """``epsilon`` or ``v_prediction`` (SD 2.x 768 models), from the scheduler config."""
        return self.noise_scheduler.config.prediction_type


def load_components(name: str) -> Components:
    """Load tokenizer, text encoder, VAE, UNet and schedulers of a base model.

    ``name`` is ``tiny``, a local diffusers folder, a ``.safetensors``/``.ckpt`` single file, or
    a Hugging Face Hub id (downloaded once into the Hub cache).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = resolve_model_folder(name)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        scheduler_config = _read_scheduler_config(folder)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder} is not a complete Stable Diffusion diffusers folder "
                             f"(tokenizer, text_encoder, vae, unet, scheduler): {exc}") from exc
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    inference_scheduler = _scheduler_class(scheduler_config).from_config(scheduler_config)
    return Components(tokenizer, text_encoder, vae, unet, noise_scheduler, inference_scheduler,
                      str(folder))


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
    from .validation import looks_like_local_path

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
                "unet/*"]
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
    from .convert import convert_single_file

    log.info("Converting %s to the diffusers layout in %s", path, target)
    convert_single_file(path, target)  # its CheckpointError is a ModelLoadError
    return target


def _read_scheduler_config(folder: Path) -> dict:
    with open(folder / "scheduler" / "scheduler_config.json", encoding="utf-8") as f:
        return json.load(f)


def _scheduler_class(config: dict):
    import diffusers

    return getattr(diffusers, config.get("_class_name", ""), diffusers.PNDMScheduler)


def save_folder_atomic(write, target: Path) -> Path:
    """Call ``write(tmp_folder)``, then move the folder into place at ``target``.

    A crash during ``write`` leaves any earlier ``target`` untouched; the old folder is swapped
    out only once the new one is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder_beside(target)
    try:
        write(tmp)
        give_ordinary_permissions(tmp)
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ----------------------------------------------------------------------------- the tiny model
def cache_dir() -> Path:
    """This package's cache folder (``$COLAB_DREAMBOOTH_CACHE`` or ``~/.cache/colab_dreambooth``)."""
    return Path(os.environ.get("COLAB_DREAMBOOTH_CACHE",
                               Path.home() / ".cache" / "colab_dreambooth"))


def tiny_model_path() -> Path:
    """The tiny model's diffusers folder in the user cache, built on first use (~2 s)."""
    target = cache_dir() / f"tiny-sd-v{TINY_VERSION}"
    if not (target / "model_index.json").is_file():
        save_folder_atomic(build_tiny_model, target)
    return target


def build_tiny_model(folder: str | os.PathLike) -> Path:
    """Write a tiny Stable Diffusion 1.x-shaped pipeline (random, seeded weights) to ``folder``."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
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

    target = cache_dir() / "clip-bpe"
    if not (target / "merges.txt").is_file():
        save_folder_atomic(write, target)
    return target


def clip_tokenizer():
    """Stable Diffusion's CLIP tokenizer (49,408 tokens, 77 positions), built offline."""
    from transformers import CLIPTokenizer

    files = _clip_vocab_files()
    return CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"),
                         model_max_length=77, pad_token="<|endoftext|>")


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
