"""The LoRA file: trained adapters in kohya's and LyCORIS's key layout, both ways.

One ``.safetensors`` file holds every adapted module under its kohya name (``lora_unet_`` or
``lora_te_`` + the module's dotted name with ``_``), which the AUTOMATIC1111 WebUI, ComfyUI,
kohya's sd-scripts, LyCORIS and diffusers' ``load_lora_weights`` all read::

    LoRA, LoCon   <key>.lora_down.weight (rank, in[, k, k])   <key>.lora_up.weight (out, rank[, 1, 1])
    LoHa          <key>.hada_w1_a (out, rank)  .hada_w1_b (rank, in*k*k)  .hada_w2_a  .hada_w2_b
    LoKr          <key>.lokr_w1 (a, c)  and  .lokr_w2 (b, d*k*k)  or  .lokr_w2_a (b, rank) .lokr_w2_b
    every type    <key>.alpha (a scalar: loaders scale the update by alpha / rank)
    DoRA          <key>.dora_scale (out, 1[, 1, 1]): the magnitude of each output row

``lora_down`` is peft's ``lora_A``; ``lora_up`` its ``lora_B``; LoHa's and LoKr's names are
peft's own (peft ported LyCORIS). Two conventions differ and are converted here:

* LoKr without any low-rank factor (``lokr_w1`` and ``lokr_w2`` both full) is applied at scale
  1 by LyCORIS, the WebUI and ComfyUI, while peft scales it by alpha / rank: the scale is folded
  into ``lokr_w2`` when writing, and ``alpha`` is written as the rank, as LyCORIS writes it.
* DoRA's magnitude is peft's ``lora_magnitude_vector`` (``(out,)``, or ``(1, out, 1, 1)`` for a
  convolution); the file holds it as LyCORIS does by default (``wd_on_out``): ``(out, 1)`` or
  ``(out, 1, 1, 1)``. ComfyUI and LyCORIS read that; diffusers' Stable Diffusion loader drops
  ``dora_scale`` keys with a warning, so :func:`colab_dreambooth.models.lora.load_adapters`
  loads DoRA (and LoHa/LoKr, which diffusers does not read) through peft.

Text-encoder names keep CLIP's ``text_model.`` level even where transformers 5 flattened it
away, because the WebUI matches ``lora_te_text_model_encoder_layers_<n>_...``. SDXL's two text
encoders are ``lora_te1_`` (CLIP-L) and ``lora_te2_`` (OpenCLIP bigG), kohya's SDXL layout,
which diffusers' SDXL ``load_lora_weights`` reads too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from colab_dreambooth.errors import ModelLoadError
from colab_dreambooth.files import file_mode, temp_file_beside
from colab_dreambooth.models.families import FAMILY, SD, SDXL
from colab_dreambooth.models.text_encoding import text_parts

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = FAMILY[SD].lora_prefixes["text_encoder"]  # lora_te_
# SDXL: each text encoder (by diffusers sub-folder) has its own prefix.
SDXL_TEXT_PREFIXES = FAMILY[SDXL].lora_prefixes  # lora_te1_, lora_te2_
PREFIXES = (UNET_PREFIX, TEXT_ENCODER_PREFIX) + tuple(SDXL_TEXT_PREFIXES.values())
ADAPTER_NAME = "default"

# The tensor names of each adapter type after ``<key>.``; ``alpha`` and ``dora_scale`` apart.
LORA_NAMES = ("lora_down.weight", "lora_up.weight")
LOHA_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_KIND_OF = {**{n: "lora" for n in LORA_NAMES}, **{n: "loha" for n in LOHA_NAMES},
            **{n: "lokr" for n in LOKR_NAMES}}


def kohya_key(prefix: str, module_name: str) -> str:
    """kohya's name of a module: ``lora_unet_`` or ``lora_te_`` + its dotted name with ``_``.

    Text-encoder names keep CLIP's ``text_model.`` level, which transformers 5 flattened away.
    """
    if prefix != UNET_PREFIX and not module_name.startswith("text_model."):
        module_name = "text_model." + module_name
    return prefix + module_name.replace(".", "_")


# ----------------------------------------------------------------------------- writing
def model_prefixes(unet, text_encoder=None) -> list[tuple[torch.nn.Module, str]]:
    """``(model, kohya prefix)`` of the UNet and each text encoder of ``text_encoder`` (SD's
    CLIP, or SDXL's :class:`~colab_dreambooth.models.text_encoding.DualTextEncoder`)."""
    found = [(unet, UNET_PREFIX)] if unet is not None else []
    if text_encoder is not None:
        parts = text_parts(text_encoder)
        if len(parts) == 1:
            found.append((parts["text_encoder"], TEXT_ENCODER_PREFIX))
        else:
            found += [(parts[name], prefix) for name, prefix in SDXL_TEXT_PREFIXES.items()]
    return found


def kohya_state_dict(unet, text_encoder=None) -> dict[str, torch.Tensor]:
    """The adapters of ``unet`` (and ``text_encoder``'s encoders) under kohya/LyCORIS keys,
    fp32 on the CPU, whatever the adapter type (peft's LoRA with or without DoRA, LoHa,
    LoKr)."""
    state: dict[str, torch.Tensor] = {}
    for model, prefix in model_prefixes(unet, text_encoder):
        for name, tensors in adapter_tensors(model).items():
            key = kohya_key(prefix, name)
            state.update({f"{key}.{part}": value for part, value in tensors.items()})
    return state


def adapter_tensors(model) -> dict[str, dict[str, torch.Tensor]]:
    """``module name -> {file tensor name: tensor}`` of every peft adapter layer in ``model``."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            found[name] = _lora_tensors(module)
        elif isinstance(module, LoHaLayer) and ADAPTER_NAME in module.hada_w1_a:
            found[name] = _lycoris_tensors(module, LOHA_NAMES)
        elif isinstance(module, LoKrLayer) and ADAPTER_NAME in module.r:
            found[name] = _lokr_tensors(module)
    return found


def _lora_tensors(module) -> dict[str, torch.Tensor]:
    out = {"lora_down.weight": _cpu32(module.lora_A[ADAPTER_NAME].weight),
           "lora_up.weight": _cpu32(module.lora_B[ADAPTER_NAME].weight),
           "alpha": torch.tensor(float(module.lora_alpha[ADAPTER_NAME]))}
    magnitude = getattr(module, "lora_magnitude_vector", None)
    if magnitude is not None and ADAPTER_NAME in magnitude:
        weight = module.get_base_layer().weight
        out["dora_scale"] = _cpu32(magnitude[ADAPTER_NAME].weight).reshape(
            weight.shape[0], *[1] * (weight.dim() - 1))
    return out


def _lycoris_tensors(module, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {n: _cpu32(getattr(module, n)[ADAPTER_NAME]) for n in names
           if ADAPTER_NAME in getattr(module, n)}
    out["alpha"] = torch.tensor(float(module.alpha[ADAPTER_NAME]))
    return out


def _lokr_tensors(module) -> dict[str, torch.Tensor]:
    out = _lycoris_tensors(module, LOKR_NAMES)
    if "lokr_w1" in out and "lokr_w2" in out:
        # No low-rank factor: the loaders apply scale 1, peft alpha / rank; fold it in.
        out["lokr_w2"] = out["lokr_w2"] * float(module.scaling[ADAPTER_NAME])
        out["alpha"] = torch.tensor(float(module.r[ADAPTER_NAME]))
    return out


def _cpu32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous().clone()


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


# ----------------------------------------------------------------------------- reading
def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata of a LoRA ``.safetensors`` file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} not found")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


@dataclass
class ModuleAdapter:
    """One module's adapter as a file holds it."""

    kind: str  # "lora", "loha" or "lokr"
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None


def file_modules(state: dict[str, torch.Tensor]) -> dict[str, ModuleAdapter]:
    """``kohya key -> ModuleAdapter`` of every module in a LoRA file's ``state``.

    Raises :class:`ModelLoadError` naming the key when a module mixes adapter types or a key is
    not one of the layouts above.
    """
    modules: dict[str, ModuleAdapter] = {}
    for full_key, value in state.items():
        key, _, part = full_key.partition(".")
        kind = _KIND_OF.get(part)
        if part in ("alpha", "dora_scale"):
            entry = modules.setdefault(key, ModuleAdapter(kind=""))
            if part == "alpha":
                entry.alpha = float(value.float().item())
            else:
                entry.dora_scale = value
            continue
        if kind is None:
            raise ModelLoadError(f"{full_key}: not a LoRA/LoCon/LoHa/LoKr tensor (this file may "
                                 "hold another adapter type, such as IA3, OFT or GLoRA, which "
                                 "are not supported)")
        entry = modules.setdefault(key, ModuleAdapter(kind=kind))
        if entry.kind and entry.kind != kind:
            raise ModelLoadError(f"{key}: mixes {entry.kind} and {kind} tensors")
        entry.kind = kind
        entry.tensors[part] = value
    for key, entry in modules.items():
        if not entry.kind:
            raise ModelLoadError(f"{key}: has an alpha or dora_scale but no adapter weights")
    return modules


def file_adapter_type(state: dict[str, torch.Tensor]) -> str:
    """What a LoRA file holds, by its keys: ``LoRA`` (or ``LoCon``), ``LoHa`` or ``LoKr``,
    with ``+DoRA`` when it has magnitudes."""
    kinds = {m.kind for m in file_modules(state).values()}
    dora = any(k.endswith(".dora_scale") for k in state)
    conv = any(k.endswith("lora_down.weight") and v.dim() == 4 and v.shape[-1] > 1
               for k, v in state.items())
    names = {"lora": "LoCon" if conv else "LoRA", "loha": "LoHa", "lokr": "LoKr"}
    name = "+".join(names[k] for k in sorted(kinds)) or "empty"
    return name + ("+DoRA" if dora else "")


def needs_peft_loader(state: dict[str, torch.Tensor]) -> bool:
    """True when diffusers' ``load_lora_weights`` cannot apply the file for Stable Diffusion
    (LoHa and LoKr it does not read, DoRA magnitudes it drops)."""
    return any(not k.endswith(tuple(LORA_NAMES) + (".alpha",)) for k in state)


def state_for_diffusers(state: dict[str, torch.Tensor], text_encoder) -> dict[str, torch.Tensor]:
    """The kohya state as the installed diffusers reads it. Before 0.40 (Colab has 0.39) its
    loader looks for a text encoder's layers under ``text_model.``, which transformers 5's
    CLIPTextModel no longer has (its CLIPTextModelWithProjection, SDXL's second encoder, still
    does): there the names lose that part, as the modules did. ``text_encoder`` is the model's
    text module (SDXL: both encoders, e.g. ``pipelines.pipeline_text_encoder(pipe)``)."""
    from importlib.metadata import version

    from packaging.version import Version

    if Version(version("diffusers")) >= Version("0.40"):
        return state
    flattened = [prefix + "text_model_" for module, prefix in model_prefixes(None, text_encoder)
                 if not hasattr(module, "text_model")]
    renamed = {}
    for key, value in state.items():
        for old in flattened:
            if key.startswith(old):
                key = old.removesuffix("text_model_") + key[len(old):]
        renamed[key] = value
    return renamed


__all__ = ["UNET_PREFIX", "TEXT_ENCODER_PREFIX", "SDXL_TEXT_PREFIXES", "PREFIXES",
           "model_prefixes", "ADAPTER_NAME", "ModuleAdapter",
           "kohya_key", "kohya_state_dict", "adapter_tensors", "save_lora",
           "read_lora", "file_modules", "file_adapter_type", "needs_peft_loader",
           "state_for_diffusers"]
