"""LoRA training and loading: peft adapters of each type on the UNet (and text encoder).

With Use LORA the DreamBooth loop stays the same; only the trained parameters change: the base
weights are frozen and peft adds small adapters whose update is scaled by ``alpha / rank``.
Lora Type chooses the adapter and where it goes, as kohya's sd-scripts and LyCORIS do:

* ``LoRA``: ``up @ down`` on the UNet's attention projections ``to_q``, ``to_k``, ``to_v``,
  ``to_out.0`` of every self- and cross-attention block (diffusers' DreamBooth LoRA) and, with
  Train Text Encoder, on CLIP's ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``.
* ``LoCon``: LoRA on every linear and 1x1 convolution of the UNet's transformer blocks
  (attention, feed-forward, ``proj_in``/``proj_out``: kohya's LoRA) and on the 3x3 convolutions
  (and their time-embedding and shortcut layers) of its ResNet, down- and up-sampling blocks,
  at Conv rank / Conv alpha; CLIP's attention and MLP layers.
* ``LoHa`` (``(w1a @ w1b) * (w2a @ w2b)``, a Hadamard product) and ``LoKr`` (a Kronecker
  product ``w1 (x) w2``) on LoCon's layers; the 3x3 convolutions only when Conv rank is above 0.
* Use DoRA (LoRA and LoCon) adds a trained magnitude per output row (peft's ``use_dora``).

:func:`add_lora` adds them for training; :mod:`colab_dreambooth.models.lora_file` writes and
reads the file; :func:`load_adapters` puts a file's adapters back onto models through peft
(LoHa, LoKr and DoRA, which diffusers' Stable Diffusion loader cannot apply).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from colab_dreambooth.config.settings import CONV_TYPES, DORA_TYPES, LORA_TYPES, safe_name
from colab_dreambooth.errors import ConfigError, ModelLoadError, Problem
from colab_dreambooth.models.families import architecture_names, unet_version
from colab_dreambooth.models.lora_file import (
    ADAPTER_NAME,
    LOHA_NAMES,
    LOKR_NAMES,
    ModuleAdapter,
    file_modules,
    kohya_key,
    model_prefixes,
)
from colab_dreambooth.models.text_encoding import text_parts

if TYPE_CHECKING:
    from colab_dreambooth.config.settings import DreamBoothConfig

UNET_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")
# kohya's and LyCORIS's target blocks: every linear and 1x1 convolution inside them at the
# rank; 3x3 convolutions at the conv rank. CLIPSdpaAttention is transformers 4's SDPA class.
UNET_TRANSFORMER_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
ADAPTER_WEIGHT_MARKERS = ("lora_", "hada_", "lokr_")  # in peft's names of adapter tensors


# ----------------------------------------------------------------------------- settings
def effective_alpha(alpha: float | None, rank: int) -> float:
    """The alpha to use: blank or 0 means the rank itself (scale 1.0), as in kohya."""
    return float(rank) if not alpha else float(alpha)


def uses_conv(config: "DreamBoothConfig") -> bool:
    """True when the run adapts the UNet's 3x3 convolutions (LoCon, LoHa/LoKr with Conv rank)."""
    return config.lora_type in CONV_TYPES and config.lora_conv_rank > 0


def uses_dora(config: "DreamBoothConfig") -> bool:
    """True when Use DoRA applies to the run's Lora Type."""
    return bool(config.use_dora) and config.lora_type in DORA_TYPES


@dataclass(frozen=True)
class AdapterPlan:
    """The modules of one model that get adapters: at the rank, and at the conv rank."""

    linear: tuple[str, ...]
    conv: tuple[str, ...] = ()

    @property
    def modules(self) -> tuple[str, ...]:
        return self.linear + self.conv


def adapter_plan(model: torch.nn.Module, lora_type: str, *, text_encoder: bool,
                 conv: bool = False) -> AdapterPlan:
    """Which modules of ``model`` (a UNet, or CLIP with ``text_encoder``) ``lora_type`` adapts;
    ``conv``: the UNet's 3x3 convolutions too."""
    if lora_type not in LORA_TYPES:
        raise ValueError(f"unknown Lora Type {lora_type!r}: one of {', '.join(LORA_TYPES)}")
    if lora_type == "LoRA":
        targets = TEXT_ENCODER_TARGET_MODULES if text_encoder else UNET_TARGET_MODULES
        return AdapterPlan(tuple(name for name, _ in model.named_modules()
                                 if name.endswith(tuple("." + t for t in targets))))
    blocks = TEXT_ENCODER_BLOCKS if text_encoder else (
        UNET_TRANSFORMER_BLOCKS + (UNET_CONV_BLOCKS if conv else ()))
    linear, convs = {}, {}
    for block_name, block in model.named_modules():
        if type(block).__name__ not in blocks:
            continue
        for child_name, child in block.named_modules():
            name = f"{block_name}.{child_name}" if block_name else child_name
            if isinstance(child, torch.nn.Linear) or (
                    isinstance(child, torch.nn.Conv2d) and child.kernel_size == (1, 1)):
                linear[name] = None
            elif isinstance(child, torch.nn.Conv2d):
                convs[name] = None
    return AdapterPlan(tuple(linear), tuple(convs))


def adapter_plan_names(config: "DreamBoothConfig") -> tuple[str, str]:
    """The UNet's and text encoder's adapted layers in words, for the file's metadata."""
    if config.lora_type == "LoRA":
        return ",".join(UNET_TARGET_MODULES), ",".join(TEXT_ENCODER_TARGET_MODULES)
    unet = UNET_TRANSFORMER_BLOCKS + (UNET_CONV_BLOCKS if uses_conv(config) else ())
    return ",".join(unet), ",".join(TEXT_ENCODER_BLOCKS)


def lora_file_path(config: "DreamBoothConfig") -> Path:
    """Where a run saves its LoRA: ``<model dir>/lora/<model name>.safetensors``."""
    return config.model_dir / "lora" / f"{safe_name(config.model_name)}.safetensors"


def peft_config(lora_type: str, plan: AdapterPlan, *, rank: int, alpha: float | None,
                conv_rank: int = 0, conv_alpha: float | None = None, dora: bool = False,
                module_ranks: dict[str, int] | None = None,
                module_alphas: dict[str, float] | None = None):
    """peft's configuration of ``lora_type`` on ``plan``'s modules; 3x3 convolutions (and any
    module in ``module_ranks``/``module_alphas``) get their own rank and alpha."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    ranks = {name: conv_rank for name in plan.conv} | dict(module_ranks or {})
    alphas = ({name: effective_alpha(conv_alpha, conv_rank) for name in plan.conv}
              | dict(module_alphas or {}))
    # Whole module names: peft matches a pattern against the end of each dotted name.
    rank_pattern = {re.escape(name): r for name, r in ranks.items()}
    alpha_pattern = {re.escape(name): a for name, a in alphas.items()}
    common = dict(target_modules=list(plan.modules), rank_pattern=rank_pattern,
                  alpha_pattern=alpha_pattern)
    if lora_type in ("LoRA", "LoCon"):
        # init_lora_weights=True: down Kaiming-uniform, up zeros (kohya's and Microsoft's), so
        # training starts exactly at the base model.
        return LoraConfig(r=rank, lora_alpha=effective_alpha(alpha, rank), lora_dropout=0.0,
                          init_lora_weights=True, use_dora=dora, **common)
    # Flattened convolution factors (no Tucker core): LyCORIS's default layout.
    if lora_type == "LoHa":
        return LoHaConfig(r=rank, alpha=effective_alpha(alpha, rank),
                          use_effective_conv2d=False, **common)
    return LoKrConfig(r=rank, alpha=effective_alpha(alpha, rank), use_effective_conv2d=False,
                      **common)


# ----------------------------------------------------------------------------- training
def add_lora(unet, text_encoder, config: "DreamBoothConfig") -> list[torch.nn.Parameter]:
    """Freeze the base weights and add trainable adapters of Lora Type; return their weights.

    The UNet always gets adapters; the text encoder only with Train Text Encoder. Adapters are
    kept in fp32 even where the frozen base was cast to fp16/bf16 (the fp16 grad scaler
    refuses fp16 parameters, and tiny updates would round away).
    """
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    lora_type, dora = config.lora_type, uses_dora(config)
    plan = adapter_plan(unet, lora_type, text_encoder=False, conv=uses_conv(config))
    unet.add_adapter(peft_config(lora_type, plan, rank=config.lora_unet_rank,
                                 alpha=config.lora_alpha, conv_rank=config.lora_conv_rank,
                                 conv_alpha=config.lora_conv_alpha, dora=dora),
                     adapter_name=ADAPTER_NAME)
    _check_ranks(unet, plan, config.lora_conv_rank)
    trained = [unet]
    if config.train_text_encoder is not False:  # blank (auto): every preset trains it with LoRA
        for encoder in text_parts(text_encoder).values():  # SDXL: both
            plan = adapter_plan(encoder, lora_type, text_encoder=True)
            encoder.add_adapter(peft_config(lora_type, plan, rank=config.lora_txt_rank,
                                            alpha=config.lora_alpha, dora=dora),
                                adapter_name=ADAPTER_NAME)
            trained.append(encoder)
    params = [p for model in trained for p in model.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()
    return params


def _check_ranks(model: torch.nn.Module, plan: AdapterPlan, conv_rank: int) -> None:
    """Refuse a peft too old to give modules their own rank (it would train the convolutions
    at the linear rank without a word)."""
    for name in plan.conv[:1]:
        got = model.get_submodule(name).r[ADAPTER_NAME]
        if got != conv_rank:
            raise ConfigError([Problem("lora_conv_rank", f"the installed peft gave {name} rank "
                                       f"{got}, not the conv rank {conv_rank}: upgrade peft "
                                       "(pip install -U peft)")])


def adapter_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors in ``module``'s state dict (what a LoRA checkpoint keeps)."""
    return {k: v for k, v in module.state_dict().items()
            if any(marker in k for marker in ADAPTER_WEIGHT_MARKERS)}


# ----------------------------------------------------------------------------- loading
def load_adapters(state: dict[str, torch.Tensor], unet, text_encoder, *,
                  adapter_name: str = "lora", scale: float = 1.0) -> int:
    """Put a LoRA file's adapters onto ``unet`` and ``text_encoder`` (SDXL: both encoders, as
    ``lora_te1_``/``lora_te2_``) through peft (any type: LoRA, LoCon, LoHa, LoKr, DoRA); return
    how many modules got one.

    ``scale`` is the WebUI's ``<lora:name:scale>`` multiplier. Raises :class:`ModelLoadError`
    when the file's modules are not in these models (another model family, SD 1 vs SD 2) or a
    tensor's shape does not fit its module.
    """
    modules = file_modules(state)
    placed: set[str] = set()
    for model, prefix in model_prefixes(unet, text_encoder):
        ours = {k: v for k, v in modules.items() if k.startswith(prefix)}
        if ours:
            placed |= _load_into(model, prefix, ours, adapter_name, scale)
    missing = sorted(set(modules) - placed)
    if missing:
        raise ModelLoadError(f"{len(missing)} of the LoRA file's {len(modules)} modules are not "
                             f"in this model (e.g. {', '.join(missing[:3])}): is the LoRA for "
                             "another base model (SD 1.x, 2.x, SDXL)?")
    return len(placed)


def _load_into(model, prefix: str, modules: dict[str, ModuleAdapter], adapter_name: str,
               scale: float) -> set[str]:
    names = {}
    for name, _ in model.named_modules():
        names[prefix + name.replace(".", "_")] = name  # also files without text_model.
        names[kohya_key(prefix, name)] = name
    found = {names[key]: (key, entry) for key, entry in modules.items() if key in names}
    if not found:
        return set()
    kinds = {entry.kind for _, entry in found.values()}
    if len(kinds) > 1:
        raise ModelLoadError(f"the LoRA file mixes adapter types ({', '.join(sorted(kinds))}) "
                             "in one model, which peft cannot load together")
    kind = kinds.pop()
    ranks = {name: _file_rank(entry) for name, (_, entry) in found.items()}
    alphas = {name: _file_alpha(entry, ranks[name]) for name, (_, entry) in found.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    lora_type = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}[kind]
    config = peft_config(
        lora_type, AdapterPlan(tuple(found)), rank=rank, alpha=alpha,
        dora=any(entry.dora_scale is not None for _, entry in found.values()),
        module_ranks={n: r for n, r in ranks.items() if r != rank},
        module_alphas={n: a for n, a in alphas.items() if a != alpha})
    model.add_adapter(config, adapter_name=adapter_name)
    with torch.no_grad():
        for name, (key, entry) in found.items():
            _copy_into(model.get_submodule(name), key, entry, adapter_name)
            if scale != 1.0:
                model.get_submodule(name).set_scale(adapter_name, scale)
    return {key for key, _ in found.values()}


def _file_rank(entry: ModuleAdapter) -> int:
    """The rank loaders divide alpha by: LoRA's and LoHa's inner size; for LoKr, that of its
    low-rank factor (w2's, else w1's), and 1 when both factors are full (applied at scale 1)."""
    t = entry.tensors
    if entry.kind == "lora":
        return int(t["lora_down.weight"].shape[0])
    if entry.kind == "loha":
        return int(t["hada_w1_b"].shape[0])
    for factor in ("lokr_w2_b", "lokr_w1_b"):
        if factor in t:
            return int(t[factor].shape[0])
    return 1


def _file_alpha(entry: ModuleAdapter, rank: int) -> float:
    if entry.kind == "lokr" and "lokr_w2_b" not in entry.tensors \
            and "lokr_w1_b" not in entry.tensors:
        return 1.0  # both factors full: scale 1, whatever alpha says (as LyCORIS applies it)
    return float(entry.alpha) if entry.alpha else float(rank)  # none or 0: scale 1


def _copy_into(module, key: str, entry: ModuleAdapter, adapter_name: str) -> None:
    if entry.kind == "lora":
        pairs = [(module.lora_A[adapter_name].weight, entry.tensors["lora_down.weight"]),
                 (module.lora_B[adapter_name].weight, entry.tensors["lora_up.weight"])]
        if entry.dora_scale is not None:
            out_features = module.get_base_layer().weight.shape[0]
            if entry.dora_scale.shape[0] != out_features or (
                    entry.dora_scale.dim() > 1 and max(entry.dora_scale.shape[1:]) > 1):
                raise ModelLoadError(
                    f"{key}: its DoRA magnitudes ({tuple(entry.dora_scale.shape)}) are per "
                    "input channel (LyCORIS's wd_on_output=False), which peft cannot apply; "
                    "per output channel, (out, 1), is supported")
            pairs.append((module.lora_magnitude_vector[adapter_name].weight, entry.dora_scale))
        for target, value in pairs:
            if target.numel() != value.numel():
                raise ModelLoadError(f"{key}: the file's tensor of shape {tuple(value.shape)} "
                                     f"does not fit this model's layer ({tuple(target.shape)})")
            target.copy_(value.reshape(target.shape).to(target.dtype))
        return
    # LoHa and LoKr: the file's factors replace peft's own, whatever split, Tucker core or
    # LoKr factor (LyCORIS's "factor", decompose_both, full matrices) the file was made with:
    # peft rebuilds the update from whichever factors a layer holds.
    names = LOHA_NAMES if entry.kind == "loha" else LOKR_NAMES
    reference = getattr(module, next(n for n in names
                                     if adapter_name in getattr(module, n)))[adapter_name]
    for name in names:
        if adapter_name in getattr(module, name):
            del getattr(module, name)[adapter_name]
    for name, value in entry.tensors.items():
        getattr(module, name)[adapter_name] = torch.nn.Parameter(
            value.to(reference.device, reference.dtype), requires_grad=False)
    try:
        delta = module.get_delta_weight(adapter_name)
    except RuntimeError as exc:  # factors that do not multiply out
        raise ModelLoadError(f"{key}: the file's factors do not fit together: {exc}") from exc
    base = module.get_base_layer().weight
    if delta.numel() != base.numel():
        raise ModelLoadError(f"{key}: the file's factors make a {tuple(delta.shape)} update for "
                             f"this model's {tuple(base.shape)} layer")


# ----------------------------------------------------------------------------- metadata
# kohya's and LyCORIS's names for the network module of each type (what the WebUI shows).
NETWORK_MODULES = {"LoRA": "networks.lora", "LoCon": "lycoris.kohya", "LoHa": "lycoris.kohya",
                   "LoKr": "lycoris.kohya"}
LYCORIS_ALGOS = {"LoRA": "lora", "LoCon": "locon", "LoHa": "loha", "LoKr": "lokr"}


def lora_metadata(config: "DreamBoothConfig", unet, *, steps: int, epochs: int, seed: int,
                  instance_prompts: list[str], num_class_images: int = 0,
                  prediction_type: str = "epsilon") -> dict[str, str]:
    """The safetensors header of a LoRA file: kohya's ``ss_*`` keys (what the WebUI shows and
    uses to tell SD 1.x from 2.x), LyCORIS's network args and the SAI ``modelspec.*`` keys.

    Holds settings, counts and prompts only: never a token or a path beyond the base model's
    name.
    """
    version = unet_version(unet.config)
    v2 = version == "sd2"
    v_pred = prediction_type == "v_prediction"
    base_version, architecture = architecture_names(version, v_pred)  # kohya's, SAI's
    te_trained = config.train_text_encoder is not False  # blank (auto): on, as in add_lora
    unet_alpha = effective_alpha(config.lora_alpha, config.lora_unet_rank)
    lora_type = config.lora_type
    args: dict[str, str] = {"algo": LYCORIS_ALGOS[lora_type]}
    if uses_conv(config):
        args.update(conv_dim=str(config.lora_conv_rank), conv_alpha=_number(
            effective_alpha(config.lora_conv_alpha, config.lora_conv_rank)))
    if uses_dora(config):
        args.update(dora_wd="True", wd_on_output="True")
    unet_targets, text_targets = adapter_plan_names(config)
    now = time.time()
    tags = Counter(tag.strip() for prompt in instance_prompts for tag in prompt.split(",")
                   if tag.strip())
    meta = {
        "ss_network_module": NETWORK_MODULES[lora_type],
        "ss_network_dim": str(config.lora_unet_rank),
        "ss_network_alpha": _number(unet_alpha),
        "ss_network_args": json.dumps(args),
        # Our own keys for what kohya's single dim/alpha cannot say (loaders read the ranks
        # from the weights' shapes; kohya's ss_network_args holds its own create_network args).
        "colab_dreambooth.lora_type": lora_type + ("+DoRA" if uses_dora(config) else ""),
        "colab_dreambooth.unet_target_modules": unet_targets,
        "colab_dreambooth.text_encoder_target_modules": text_targets if te_trained else "",
        "colab_dreambooth.text_encoder_dim": str(config.lora_txt_rank if te_trained else 0),
        "colab_dreambooth.text_encoder_alpha": _number(
            effective_alpha(config.lora_alpha, config.lora_txt_rank) if te_trained else 0.0),
        "ss_network_train_unet_only": str(not te_trained),
        "ss_base_model_version": base_version,
        "ss_v2": str(v2),
        "ss_sd_model_name": metadata_model_name(config.base_model),
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
        "ss_training_comment": f"DreamBooth {lora_type} by colab-dreambooth; instance prompts: "
                               + " | ".join(dict.fromkeys(c.instance_prompt
                                                          for c in config.concepts_list)),
        "ss_instance_prompts": json.dumps(sorted(set(instance_prompts))),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture + "/"
                                  + ("lora" if lora_type == "LoRA" else "lycoris"),
        "modelspec.implementation": "diffusers",
        "modelspec.title": safe_name(config.model_name),
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
    }
    return meta


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def metadata_model_name(model: str) -> str:
    """A model's name for a file's metadata, without the folders of this machine: ``tiny`` or
    a Hub id as it is, else the last part of the path (a run's name rather than its ``model``
    folder)."""
    model = model.strip().rstrip("/\\")
    if re.match(r"^[\w.-]+/[\w.-]+$", model) and not Path(model).expanduser().exists():
        return model  # a Hub id
    parts = [p for p in re.split(r"[/\\]", model) if p]
    if len(parts) > 1 and parts[-1] == "model":
        return parts[-2]
    return parts[-1] if parts else model


__all__ = ["LORA_TYPES", "DORA_TYPES", "CONV_TYPES", "UNET_TARGET_MODULES",
           "TEXT_ENCODER_TARGET_MODULES", "AdapterPlan", "adapter_plan", "adapter_plan_names",
           "effective_alpha", "uses_conv", "uses_dora", "lora_file_path", "peft_config",
           "add_lora", "adapter_weights", "load_adapters", "lora_metadata",
           "metadata_model_name"]
