"""LoRA training: peft adapters on the UNet (and text encoder), saved in kohya's key layout.

With Use LORA the DreamBooth loop stays the same; only the trained parameters change: the base
weights are frozen and peft adds low-rank adapters ``W + (alpha / rank) * up @ down`` to

* the UNet's attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every
  self-attention (``attn1``) and cross-attention (``attn2``) block, as diffusers' DreamBooth
  LoRA script does (kohya also adapts ``proj_in``/``proj_out`` and the feed-forward layers);
* with Train Text Encoder, CLIP's self-attention ``q_proj``, ``k_proj``, ``v_proj``,
  ``out_proj`` (kohya and diffusers also name these; kohya adds the MLP).

The result is one ``.safetensors`` file in kohya's layout, which the AUTOMATIC1111 WebUI,
kohya's sd-scripts and diffusers' ``load_lora_weights`` all read::

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight   (and so on)

``lora_down`` is peft's ``lora_A`` (rank x in), ``lora_up`` its ``lora_B`` (out x rank) and
``alpha`` a scalar: a loader scales ``up @ down`` by ``alpha / rank``. Text-encoder names keep
CLIP's ``text_model.`` level even where transformers 5 flattened it away, because the WebUI
matches ``lora_te_text_model_encoder_layers_<n>_...``; diffusers strips it again when loading.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch

from colab_dreambooth.config.settings import safe_name
from colab_dreambooth.files import file_mode, temp_file_beside

if TYPE_CHECKING:
    from colab_dreambooth.config.settings import DreamBoothConfig

UNET_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")
UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"
ADAPTER_NAME = "default"


# ----------------------------------------------------------------------------- settings


def effective_alpha(alpha: float | None, rank: int) -> float:
    """The alpha to use: blank or 0 means the rank itself (scale 1.0), as in kohya."""
    return float(rank) if not alpha else float(alpha)


def lora_file_path(config: "DreamBoothConfig") -> Path:
    """Where a run saves its LoRA: ``<model dir>/lora/<model name>.safetensors``."""
    return config.model_dir / "lora" / f"{safe_name(config.model_name)}.safetensors"


# ----------------------------------------------------------------------------- training
def add_lora(unet, text_encoder, config: "DreamBoothConfig") -> list[torch.nn.Parameter]:
    """Freeze the base weights and add trainable LoRA adapters; return the adapters' weights.

    The UNet always gets adapters; the text encoder only with Train Text Encoder. Adapters are
    kept in fp32 even where the frozen base was cast to fp16/bf16 (the fp16 grad scaler
    refuses fp16 parameters, and tiny updates would round away).
    """
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.add_adapter(_lora_config(config.lora_unet_rank, config.lora_alpha,
                                  UNET_TARGET_MODULES), adapter_name=ADAPTER_NAME)
    trained = [unet]
    if config.train_text_encoder is not False:  # blank (auto): every preset trains it with LoRA
        text_encoder.add_adapter(_lora_config(config.lora_txt_rank, config.lora_alpha,
                                              TEXT_ENCODER_TARGET_MODULES),
                                 adapter_name=ADAPTER_NAME)
        trained.append(text_encoder)
    params = [p for model in trained for p in model.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()
    return params


def _lora_config(rank: int, alpha: float | None, targets: Iterable[str]):
    from peft import LoraConfig

    # init_lora_weights=True: down Kaiming-uniform, up zeros (kohya's and Microsoft's), so
    # training starts exactly at the base model.
    return LoraConfig(r=rank, lora_alpha=effective_alpha(alpha, rank),
                      target_modules=list(targets), init_lora_weights=True, lora_dropout=0.0)


# ----------------------------------------------------------------------------- the file
def kohya_state_dict(unet, text_encoder=None) -> dict[str, torch.Tensor]:
    """The adapters of ``unet`` (and ``text_encoder``) as kohya keys, fp32 on the CPU."""
    state: dict[str, torch.Tensor] = {}
    for model, prefix in ((unet, UNET_PREFIX), (text_encoder, TEXT_ENCODER_PREFIX)):
        if model is None:
            continue
        for name, (down, up, alpha) in _adapters(model).items():
            key = kohya_key(prefix, name)
            state[f"{key}.lora_down.weight"] = down
            state[f"{key}.lora_up.weight"] = up
            state[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return state


def kohya_key(prefix: str, module_name: str) -> str:
    """kohya's name of a module: ``lora_unet_`` or ``lora_te_`` + its dotted name with ``_``.

    Text-encoder names keep CLIP's ``text_model.`` level, which transformers 5 flattened away.
    """
    if prefix == TEXT_ENCODER_PREFIX and not module_name.startswith("text_model."):
        module_name = "text_model." + module_name
    return prefix + module_name.replace(".", "_")


def _adapters(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``module name -> (down, up, alpha)`` of every peft LoRA layer in ``model``."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            down = module.lora_A[ADAPTER_NAME].weight
            up = module.lora_B[ADAPTER_NAME].weight
            found[name] = (_cpu32(down), _cpu32(up), float(module.lora_alpha[ADAPTER_NAME]))
    return found


def _cpu32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous().clone()


def lora_metadata(config: "DreamBoothConfig", unet, *, steps: int, epochs: int, seed: int,
                  instance_prompts: list[str], num_class_images: int = 0,
                  prediction_type: str = "epsilon") -> dict[str, str]:
    """The safetensors header of a LoRA file: kohya's ``ss_*`` keys (what the WebUI shows and
    uses to tell SD 1.x from 2.x) and the SAI ``modelspec.*`` keys.

    Holds settings, counts and prompts only: never a token or a path beyond the base model's
    name.
    """
    v2 = getattr(unet.config, "cross_attention_dim", 768) == 1024  # OpenCLIP ViT-H
    v_pred = prediction_type == "v_prediction"
    base_version = ("sd_v2" if v2 else "sd_v1") + ("_v" if v_pred else "")  # kohya's names
    te_trained = config.train_text_encoder is not False  # blank (auto): on, as in add_lora
    unet_alpha = effective_alpha(config.lora_alpha, config.lora_unet_rank)
    now = time.time()
    tags = Counter(tag.strip() for prompt in instance_prompts for tag in prompt.split(",")
                   if tag.strip())
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.lora_unet_rank),
        "ss_network_alpha": _number(unet_alpha),
        # Our own keys for what kohya's single dim/alpha cannot say (loaders read the ranks
        # from the weights' shapes; kohya's ss_network_args holds its own create_network args).
        "colab_dreambooth.unet_target_modules": ",".join(UNET_TARGET_MODULES),
        "colab_dreambooth.text_encoder_target_modules":
            ",".join(TEXT_ENCODER_TARGET_MODULES) if te_trained else "",
        "colab_dreambooth.text_encoder_dim": str(config.lora_txt_rank if te_trained else 0),
        "colab_dreambooth.text_encoder_alpha": _number(
            effective_alpha(config.lora_alpha, config.lora_txt_rank) if te_trained else 0.0),
        "ss_network_train_unet_only": str(not te_trained),
        "ss_base_model_version": base_version,
        "ss_v2": str(v2),
        "ss_sd_model_name": _model_name(config.base_model),
        "ss_output_name": safe_name(config.model_name),
        "ss_learning_rate": _number(config.lora_learning_rate),
        "ss_unet_lr": _number(config.lora_learning_rate),
        "ss_text_encoder_lr": _number(config.lora_txt_learning_rate if te_trained else 0.0),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        # train() fills blank (auto) fields before saving; "auto" only for a direct call.
        "ss_mixed_precision": config.mixed_precision or "auto",
        "ss_batch_size_per_device": str(config.train_batch_size or "auto"),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_prior_loss_weight": _number(config.prior_loss_weight),
        "ss_optimizer": config.optimizer,
        "ss_clip_skip": str(config.clip_skip),
        "ss_max_token_length": str(config.max_token_length),
        "ss_noise_offset": _number(config.offset_noise),
        "ss_min_snr_gamma": _number(config.min_snr_gamma),
        "ss_shuffle_caption": str(config.shuffle_tags),
        "ss_keep_tokens": str(config.keep_tokens),
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_steps": str(steps),
        "ss_epoch": str(epochs),
        "ss_seed": str(seed),
        "ss_num_train_images": str(len(instance_prompts)),
        "ss_num_reg_images": str(num_class_images),
        "ss_training_finished_at": str(now),
        "ss_tag_frequency": json.dumps({f"1_{safe_name(config.model_name)}": dict(tags)}),
        "ss_training_comment": "DreamBooth LoRA by colab-dreambooth; instance prompts: "
                               + " | ".join(dict.fromkeys(c.instance_prompt
                                                          for c in config.concepts_list)),
        "ss_instance_prompts": json.dumps(sorted(set(instance_prompts))),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ("stable-diffusion-v2-768-v" if v2 and v_pred else
                                   "stable-diffusion-v2-512" if v2 else
                                   "stable-diffusion-v1") + "/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": safe_name(config.model_name),
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
    }
    return meta


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _model_name(base: str) -> str:
    """The base model's name without the folders of this machine (``tiny``, a Hub id, or a
    file or folder name)."""
    base = base.strip().rstrip("/\\")
    if re.match(r"^[\w.-]+/[\w.-]+$", base) and not Path(base).expanduser().exists():
        return base  # a Hub id
    return re.split(r"[/\\]", base)[-1]


def save_lora(path: str | os.PathLike, state: dict[str, torch.Tensor],
              metadata: dict[str, str]) -> Path:
    """Write ``state`` with ``metadata`` to ``path`` atomically (temp name, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.chmod(tmp, file_mode())  # save_file makes the file anew: its own (private) mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata of a LoRA ``.safetensors`` file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} not found")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


# ----------------------------------------------------------------------------- using it


def state_for_diffusers(state: dict[str, torch.Tensor], text_encoder) -> dict[str, torch.Tensor]:
    """The kohya state as the installed diffusers reads it. Before 0.40 (Colab has 0.39) its
    loader looks for the text encoder's layers under ``text_model.``, which transformers 5's
    CLIPTextModel no longer has: there the names lose that part, as the modules did."""
    from importlib.metadata import version

    from packaging.version import Version

    if Version(version("diffusers")) >= Version("0.40") or hasattr(text_encoder, "text_model"):
        return state
    return {k.replace("lora_te_text_model_", "lora_te_", 1): v for k, v in state.items()}


__all__ = ["UNET_TARGET_MODULES", "TEXT_ENCODER_TARGET_MODULES", "UNET_PREFIX",
           "TEXT_ENCODER_PREFIX", "kohya_key", "effective_alpha", "lora_file_path", "add_lora",
           "kohya_state_dict", "lora_metadata", "save_lora", "read_lora", "state_for_diffusers"]
