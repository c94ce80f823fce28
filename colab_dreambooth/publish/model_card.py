"""A Hugging Face Hub model card (``README.md``) for a trained model folder.

The card is built from what :func:`~colab_dreambooth.training.train.train` saves inside the model
folder, ``params.json`` and ``training_info.json``: YAML front matter the Hub reads (license, base
model, tags, instance prompt), the trigger words to put in prompts, the concepts, the training
settings, a sample grid and a usage snippet.

Nothing private leaves the machine through the card: data folders appear by their own name
only (never their absolute path), a local base model by its file or folder name, and anything
shaped like a Hugging Face token is blanked.

Example::

    write_model_card(result.model_dir, grid=samples.grid, repo_id="me/sks-dog")
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from PIL import Image

from colab_dreambooth.config.concept import Concept
from colab_dreambooth.config.params import read_params
from colab_dreambooth.config.prompts import FILEWORDS
from colab_dreambooth.config.settings import TINY_MODEL, TINY_SDXL_MODEL, DreamBoothConfig
from colab_dreambooth.config.validation import looks_like_local_path
from colab_dreambooth.errors import UserError
from colab_dreambooth.files import copy_file_atomic, write_text_atomic
from colab_dreambooth.generation.sample import save_image_atomic
from colab_dreambooth.models.families import FAMILY, SDXL, detect_family
from colab_dreambooth.models.lora import effective_alpha, lora_file_path, uses_conv, uses_dora
from colab_dreambooth.runtime.environment import mount_drive_if_needed

LICENSE = "creativeml-openrail-m"
TAGS = ("stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "dreambooth",
        "diffusers")
LORA_TAGS = ("lora", "template:sd-lora")
GRID_NAME = "samples.png"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")
# Words of an instance prompt that are never its trigger word.
_COMMON_WORDS = frozenset("""a an the of in on at with and or by for to from photo photograph
    picture image portrait painting drawing style close up closeup shot high quality detailed
    my our your his her their this that""".split())


class ModelCardError(UserError, ValueError):
    """The model folder lacks what the card is built from; the message says what to do."""


def write_model_card(model_dir: str | Path, out_path: str | Path | None = None, *,
                     grid: Image.Image | str | Path | None = None,
                     repo_id: str | None = None, lora_file: str | None = None) -> Path:
    """Write a Hub-ready ``README.md`` for the trained model in ``model_dir``; return its path.

    ``out_path`` defaults to ``<model_dir>/README.md`` (the Hub shows the README at the root of
    the uploaded folder). ``grid`` (a PIL image or an image file, e.g. a sample grid) is copied
    next to the card as ``samples.png`` and shown in it. ``repo_id`` is used in the usage
    snippet, ``lora_file`` (a LoRA run) the file name its snippets load (default: the run's).
    Raises :class:`ModelCardError` when ``params.json`` is missing.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "params.json").is_file():
        # The run's working folder <models root>/dreambooth/<name>: its model/ or its lora/.
        for sub in ("model", "lora"):
            if (model_dir / sub / "params.json").is_file():
                model_dir = model_dir / sub
                break
    out_path = Path(out_path) if out_path is not None else model_dir / "README.md"
    params_file = model_dir / "params.json"
    if not params_file.is_file():
        raise ModelCardError(f"{params_file} not found: give the folder that training wrote "
                             "(<models root>/dreambooth/<model name>/model, or .../lora for a "
                             "LoRA run)")
    config = read_params(params_file).config
    info_file = model_dir / "training_info.json"
    info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
    if lora_file:
        info["lora_file"] = lora_file

    grid_name = None
    if grid is not None:
        grid_name = _copy_grid(grid, out_path.parent)
    text = card_text(config, info, grid_name=grid_name, repo_id=repo_id)
    mount_drive_if_needed(out_path)  # never a folder under an unmounted /content/drive
    write_text_atomic(out_path, text)
    return out_path


def card_text(config: DreamBoothConfig, info: dict[str, Any] | None = None, *,
              grid_name: str | None = None, repo_id: str | None = None) -> str:
    """The card's Markdown for ``config`` and the run's ``training_info`` (may be empty)."""
    info = info or {}
    base = str(info.get("base_model") or config.base_model)
    hub_base = base if _is_hub_id(base) else None
    lora = bool(info.get("lora", config.use_lora))
    concepts = config.concepts_list
    front = ["---", f"license: {LICENSE}"]
    if hub_base:
        front.append(f"base_model: {hub_base}")
    if concepts:
        front.append(f"instance_prompt: {_yaml_str(card_prompt(concepts[0]))}")
    xl = ("stable-diffusion-xl",) if detect_family(config.base_model) == SDXL else ()
    front += ["tags:"] + [f"- {tag}" for tag in TAGS + xl + (LORA_TAGS if lora else ())]
    front += ["library_name: diffusers", "pipeline_tag: text-to-image", "inference: true", "---"]

    title = repo_id.split("/")[-1] if repo_id else config.model_name
    what = ("LoRA adapters (DreamBooth-LoRA) for" if lora else "A DreamBooth fine-tune of")
    lines = front + ["", f"# {title}", "",
                     f"{what} {_base_link(base)}, trained with colab-dreambooth (the "
                     "AUTOMATIC1111 Dreambooth extension's settings).", ""]
    triggers = [trigger_word(c) for c in concepts]
    if any(triggers):
        words = ", ".join(f"`{w}`" for w in dict.fromkeys(t for t in triggers if t))
        lines += ["## Trigger words", "",
                  f"Put {words} in your prompt, with the class word, as in the instance "
                  "prompts below.", ""]
    if concepts:
        lines += ["## Concepts", "", "| # | Instance prompt | Trigger word | Class prompt | "
                  "Class images | Instance images folder |", "|---|---|---|---|---|---|"]
        for k, (concept, trigger) in enumerate(zip(concepts, triggers), 1):
            prior = concept.num_class_images if concept.wants_prior_preservation else 0
            lines.append(f"| {k} | {_cell(concept.instance_prompt)} | {_cell(trigger)} | "
                         f"{_cell(concept.class_prompt) or '-'} | {prior or '-'} | "
                         f"{_cell(folder_name(concept.instance_data_dir)) or '-'} |")
        lines.append("")
    if grid_name:
        lines += ["## Samples", "", f"![Samples]({grid_name})", ""]
    lines += ["## Training settings", "", "| Setting | Value |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in training_settings(config, info)]
    prompt = card_prompt(concepts[0]) if concepts else "a photo"
    lines += ["", "## Use it", ""]
    if lora:
        lines += _lora_usage(config, info, base, hub_base, repo_id, prompt)
    else:
        pipeline = _pipeline_class(config)
        lines += ["```python", "import torch", f"from diffusers import {pipeline}",
                  "",
                  f"pipe = {pipeline}.from_pretrained({json.dumps(repo_id or '.')}, "
                  "torch_dtype=torch.float16).to(\"cuda\")",
                  f"image = pipe({json.dumps(prompt)}, num_inference_steps=30, "
                  "guidance_scale=7.5).images[0]",
                  "image.save(\"sample.png\")", "```", ""]
    return _scrub("\n".join(lines), config)


def _lora_usage(config: DreamBoothConfig, info: dict[str, Any], base: str,
                hub_base: str | None, repo_id: str | None, prompt: str) -> list[str]:
    """Loading snippets of a LoRA: diffusers' ``load_lora_weights`` on the base, the WebUI."""

    file = str(info.get("lora_file") or lora_file_path(config).name)
    base_id = hub_base or ("<the base model: " + _display_model(base) + ">")
    where = json.dumps(repo_id or ".")
    webui = (f"In the AUTOMATIC1111 WebUI or ComfyUI: put `{file}` in `models/Lora` and add "
             f"`<lora:{Path(file).stem}:1>` to the prompt, on the same base model.")
    if config.lora_type in ("LoHa", "LoKr") or uses_dora(config):
        # diffusers' Stable Diffusion loader reads neither LoHa/LoKr nor DoRA's magnitudes.
        return [webui, "", "With diffusers (through peft; `pip install colab-dreambooth`):", "",
                "```python", "from colab_dreambooth.models.pipelines import load_lora_pipeline",
                "", f"pipe = load_lora_pipeline({json.dumps(base_id)}, {json.dumps(file)})",
                f"image = pipe({json.dumps(prompt)}, num_inference_steps=30, "
                "guidance_scale=7.5).images[0]", "image.save(\"sample.png\")", "```", ""]
    pipeline = _pipeline_class(config)
    return ["```python", "import torch", f"from diffusers import {pipeline}", "",
            f"pipe = {pipeline}.from_pretrained({json.dumps(base_id)}, "
            "torch_dtype=torch.float16).to(\"cuda\")",
            *([] if repo_id else ['# "." is the folder that holds the LoRA file']),
            *(["# diffusers 0.40 or newer: older ones with transformers 5 cannot place the "
               "text-encoder part"] if config.train_text_encoder else []),
            f"pipe.load_lora_weights({where}, weight_name={json.dumps(file)})",
            f"image = pipe({json.dumps(prompt)}, num_inference_steps=30, "
            "guidance_scale=7.5).images[0]",
            "image.save(\"sample.png\")", "```", "", webui, ""]


def training_settings(config: DreamBoothConfig, info: dict[str, Any]) -> list[tuple[str, str]]:
    """(setting, value) rows describing how the model was trained."""
    steps, total = info.get("steps"), info.get("total_steps")
    if steps is None:
        step_text = str(config.max_train_steps or "-")
    elif total and steps < total:
        step_text = f"{steps} of {total} (stopped early)"
    else:
        step_text = str(steps)
    epochs = info.get("epochs") if info.get("epochs") is not None else config.num_train_epochs
    lora = bool(info.get("lora", config.use_lora))
    rows = [("Base model", _display_model(str(info.get("base_model") or config.base_model))),
            ("Training steps", step_text), ("Epochs", str(epochs or "-"))]
    if lora:
        rows.append(("LoRA type", config.lora_type + (" + DoRA" if uses_dora(config) else "")))
        if uses_conv(config):
            rows.append(("Conv rank / alpha", f"{config.lora_conv_rank} / "
                         f"{effective_alpha(config.lora_conv_alpha, config.lora_conv_rank):g}"))
        rows.append(("LoRA rank / alpha (UNet)", f"{config.lora_unet_rank} / "
                     f"{effective_alpha(config.lora_alpha, config.lora_unet_rank):g}"))
        if config.train_text_encoder:
            rows.append(("LoRA rank / alpha (text encoder)", f"{config.lora_txt_rank} / "
                         f"{effective_alpha(config.lora_alpha, config.lora_txt_rank):g}"))
    unet_lr, text_lr = ((config.lora_learning_rate, config.lora_txt_learning_rate) if lora
                        else (config.learning_rate, config.text_encoder_learning_rate))
    rows.append(("Learning rate (UNet)", f"{unet_lr:g}"))
    if config.train_text_encoder:
        rows.append(("Learning rate (text encoder)", f"{text_lr:g}"))
    warmup = f", {config.lr_warmup_steps} warm-up steps" if config.lr_warmup_steps else ""
    rows.append(("LR scheduler", config.lr_scheduler + warmup
                 + (" (scaled by batch size)" if config.scale_lr else "")))
    rows += [("Resolution", f"{config.resolution} px"),
             ("Batch size", f"{config.train_batch_size}" + (
                 f" x {config.gradient_accumulation_steps} accumulation steps"
                 if config.gradient_accumulation_steps > 1 else ""))]
    prior = [c for c in config.concepts_list if c.wants_prior_preservation]
    rows.append(("Prior preservation", (
        f"yes ({sum(c.num_class_images for c in prior)} class images, prior loss weight "
        f"{config.prior_loss_weight:g})") if prior else "no"))
    if config.train_text_encoder:
        part = "" if config.stop_text_encoder >= 1 else \
            f" (first {config.stop_text_encoder:.0%} of the steps)"
        rows.append(("Text encoder", "trained" + part))
    else:
        rows.append(("Text encoder", "frozen"))
    ema = info.get("ema", config.use_ema)
    rows.append(("EMA", f"yes (max decay {config.ema_decay:g}, weights in unet_ema/)"
                 if ema else "no"))
    precision = config.mixed_precision
    rows.append(("Mixed precision", "no (fp32, trained on the CPU)" if config.use_cpu
                 else precision))
    rows.append(("Optimizer", ("8-bit " if config.use_8bit_adam else "") + config.optimizer))
    rows.append(("Flip / center crop", f"{'on' if config.hflip else 'off'} / "
                 f"{'on' if config.center_crop else 'off'}"))
    if info.get("seed") is not None:
        rows.append(("Seed", str(info["seed"])))
    return rows


def trigger_word(concept: Concept) -> str:
    """The word that calls the concept: its Instance Token, else the rare word of its prompt.

    The rare word is the first word of the instance prompt that is neither in the class prompt
    or class tokens nor a common word: ``"a photo of sks dog"`` with class prompt
    ``"a photo of dog"`` gives ``"sks"``.
    """
    token = " ".join(concept.instance_token.split())
    if token:
        return token
    known = {w.lower() for w in _words(concept.class_prompt + " " + concept.class_token)}
    for word in _words(FILEWORDS.sub(" ", concept.instance_prompt)):
        if word.lower() not in known and word.lower() not in _COMMON_WORDS:
            return word
    return ""


def card_prompt(concept: Concept) -> str:
    """A prompt that calls the concept: its instance prompt, or, when that is made from
    captions (``[filewords]``), the trigger word and the class word."""
    prompt = " ".join(concept.instance_prompt.split())
    if not FILEWORDS.search(prompt):
        return prompt
    classes = [c.strip() for c in concept.class_token.split(",") if c.strip()]
    word = re.sub(r"^(?:a|an|the)\s+", "", min(classes, key=len), flags=re.I) if classes else ""
    rest = FILEWORDS.sub(" ", prompt).strip(" ,")
    core = " ".join(part for part in (trigger_word(concept), word) if part)
    return " ".join(f"a photo of {core} {rest}".split()) if core else rest


def folder_name(path: str) -> str:
    """The last part of a folder path, whether written for Windows or POSIX."""
    path = path.strip().rstrip("/\\")
    if not path:
        return ""
    return PureWindowsPath(path).name if "\\" in path else PurePosixPath(path).name


# ----------------------------------------------------------------------------- internals
def _pipeline_class(config: DreamBoothConfig) -> str:
    """The diffusers pipeline that runs the model: SDXL's for an SDXL base."""
    return FAMILY[detect_family(config.base_model)].pipeline


def _words(text: str) -> list[str]:
    return re.findall(r"[\w'-]+", text)


def _is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not looks_like_local_path(name)


def _display_model(name: str) -> str:
    if name == TINY_MODEL:
        return "tiny (colab-dreambooth's built-in test model)"
    if name == TINY_SDXL_MODEL:
        return "tiny-sdxl (colab-dreambooth's built-in SDXL-shaped test model)"
    if _is_hub_id(name):
        return name
    return f"{folder_name(name)} (a local model)"


def _base_link(name: str) -> str:
    if _is_hub_id(name):
        return f"[{name}](https://huggingface.co/{name})"
    return f"`{_display_model(name)}`"


def _yaml_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _copy_grid(grid: Image.Image | str | Path, folder: Path) -> str:
    """Put the sample grid next to the card as ``samples.png``; return its name."""

    target = folder / GRID_NAME
    if isinstance(grid, Image.Image):
        save_image_atomic(grid, target)
        return GRID_NAME
    source = Path(grid)
    if not source.is_file():
        raise ModelCardError(f"sample grid {source} not found: give an image file or a PIL "
                             "image")
    if target.exists() and target.resolve() == source.resolve():
        return GRID_NAME
    if source.suffix.lower() == ".png":
        copy_file_atomic(source, target)
    else:
        with Image.open(source) as image:
            save_image_atomic(image.convert("RGB"), target)
    return GRID_NAME


def _scrub(text: str, config: DreamBoothConfig) -> str:
    """Blank tokens, and reduce any local path of the config that slipped in to its name."""
    text = _HF_TOKEN.sub("hf_***", text)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        secret = os.environ.get(name, "").strip()
        if len(secret) >= 8:
            text = text.replace(secret, "***")
    paths = [config.models_root, config.src, config.pretrained_model_name_or_path,
             config.concepts_path]
    for concept in config.concepts_list:
        paths += [concept.instance_data_dir, concept.class_data_dir,
                  concept.save_sample_template]
    for path in sorted({p.strip() for p in paths if p.strip()}, key=len, reverse=True):
        if looks_like_local_path(path) and ("/" in path or "\\" in path):
            text = text.replace(path, folder_name(path))
    return text


