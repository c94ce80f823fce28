"""Reading the AUTOMATIC1111 Dreambooth extension's saved files: its vocabulary and its
translations.

The extension's ``db_config.json`` (its late-2022 and later generations) and ``concepts_list``
files load through :func:`colab_dreambooth.config.params.params_from_dict`; this module holds what
that needs to know about them: the keys it renamed, the keys it has and we do not use (ignored
and reported), and the keys whose meaning needs more than a rename (optimizer display names,
scheduler names, a step count of 0, per-image class-image counts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from colab_dreambooth.config.fields import coerce_into, field_specs
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.errors import Problem
from colab_dreambooth.files import list_image_files

_RUN_FIELDS = field_specs(DreamBoothConfig)

# The extension's later names for our fields.
RENAMED_KEYS = {
    "txt_learning_rate": "text_encoder_learning_rate",
    "adamw_weight_decay": "weight_decay",
    "adam_weight_decay": "weight_decay",
    "tf32_enable": "allow_tf32",  # in the extension's key lists; diffusers' name is ours
}
# Keys the extension writes that we have no use for (ignored, and the load says which). Its
# half_model casts the exported checkpoint to fp16 (our export's fp16 option), not the
# full-fp16 training of our full_fp16, so it is not read as that.
EXTENSION_ONLY_KEYS = frozenset("""
    adaptation_beta1 adaptation_beta2 adaptation_d0 adaptation_eps custom_model_name
    deis_train_scheduler disable_class_matching disable_logging dream_detail_preservation
    dynamic_img_norm ema_predict epoch epoch_pause_frequency epoch_pause_time
    freeze_spectral_norm gradient_set_to_none graph_smoothing half_model has_ema infer_ema
    initial_revision learning_rate_min lifetime_revision lora_model_name lora_txt_weight
    lora_use_buggy_requires_grad lora_weight lr_factor lr_scale_pos model_dir model_path
    model_type prior_loss_scale prior_loss_target
    prior_loss_weight_min revision sanity_prompt sanity_seed save_ckpt_after save_ckpt_cancel
    save_ckpt_during save_class_txt save_ema save_lora_after save_lora_cancel save_lora_during
    save_lora_for_extra_net save_safetensors save_state_after save_state_cancel
    save_state_during save_use_epochs save_use_global_counts scheduler shared_diffusers_path
    shuffle_after_epoch snapshot split_loss strict_tokens tenc_grad_clip_norm tomesd
    train_imagic train_imagic_only train_unet train_unfrozen use_concepts use_dream
    use_shared_src use_subdir use_unet v2 weight_dtype full_mixed_precision
    input_pertubation adaptation_growth_rate adaptation_momentum enable_tomesd half_lora
    lora_rank min_learning_rate train_conditioning unfreeze_model use_filename_as_label
    use_txt_as_label train_text_encoder_steps name output_dir working_dir total_steps
    with_prior_preservation negative_prompt
""".split())
EXTENSION_ONLY_CONCEPT_KEYS = frozenset({"is_valid", "max_steps", "num_class_images_per"})
# The extension's optimizer display names: (our optimizer, 8-bit or not).
EXTENSION_OPTIMIZERS: dict[str, tuple[str, bool | None]] = {
    "8bit adamw": ("AdamW", True), "8bit adam": ("AdamW", True), "adamw8bit": ("AdamW", True),
    "torch adamw": ("AdamW", False), "adamw": ("AdamW", None),
    "lion": ("Lion", False), "8bit lion": ("Lion", True), "lion8bit": ("Lion", True),
    "prodigy": ("Prodigy", None), "adafactor": ("Adafactor", None),
}


def strip_db_prefix(key: str) -> str:
    """``key`` without ``db_``: the extension's UI names its fields db_<key>, and some saved
    files keep that prefix."""
    return key[3:] if key.startswith("db_") else key


# Keys read by import_extension_specials, not by their name alone.
SPECIAL_KEYS = {"not_cache_latents", "optimizer", "stop_text_encoder", "max_train_steps",
                "lr_scheduler", "save_embedding_every", "use_lora_extended"}
# The extension's scheduler names that are ours under another name.
EXTENSION_SCHEDULERS = {"linear_with_warmup": "linear", "cosine_annealing": "cosine",
                        "cosine_annealing_with_restarts": "cosine_with_restarts"}


def import_extension_specials(data: dict[str, Any], values: dict[str, Any],
                              problems: list[Problem], notes: list[str],
                              ignored: list[str]) -> None:
    """Read the extension keys whose meaning needs more than a rename (:data:`SPECIAL_KEYS`)
    from ``data`` into ``values``, adding what went wrong and what was read how."""
    if "max_train_steps" in data:
        steps = data["max_train_steps"]
        if (isinstance(steps, (int, float)) and not isinstance(steps, bool) and steps < 1
                and float(steps).is_integer()):
            # The extension's late-2022 files write 0 (or -1) for "use the epochs".
            notes.append(f"read max_train_steps {steps!r} as blank: the epochs decide")
            values["max_train_steps"] = None
        else:
            coerce_into(values, _RUN_FIELDS["max_train_steps"], steps, "max_train_steps",
                        problems)
    if "lr_scheduler" in data:
        name = data["lr_scheduler"]
        if name in EXTENSION_SCHEDULERS:
            notes.append(f"read the extension's lr_scheduler {name!r} as "
                         f"{EXTENSION_SCHEDULERS[name]!r}")
            name = EXTENSION_SCHEDULERS[name]
        coerce_into(values, _RUN_FIELDS["lr_scheduler"], name, "lr_scheduler", problems)
    if "save_embedding_every" in data and "save_every_epochs" not in data:
        # Late-2022 files count it in steps unless their save_use_epochs is on.
        target = ("save_every_steps" if data.get("save_use_epochs") is False
                  else "save_every_epochs")
        if target not in data:
            coerce_into(values, _RUN_FIELDS[target], data["save_embedding_every"],
                        "save_embedding_every", problems)
            notes.append(f"read the extension's save_embedding_every as {target}")
    if "not_cache_latents" in data and "cache_latents" not in data:
        if isinstance(data["not_cache_latents"], bool):
            values["cache_latents"] = not data["not_cache_latents"]
        else:
            problems.append(Problem("not_cache_latents", "expected true or false"))
    if "stop_text_encoder" in data:
        coerce_into(values, _RUN_FIELDS["stop_text_encoder"], data["stop_text_encoder"],
                    "stop_text_encoder", problems)
        fraction = values.get("stop_text_encoder")
        if "train_text_encoder" not in data and isinstance(fraction, float):
            values["train_text_encoder"] = fraction > 0
    if "optimizer" in data:
        name = data["optimizer"]
        mapped = EXTENSION_OPTIMIZERS.get(str(name).strip().lower())
        if mapped:
            values["optimizer"] = mapped[0]
            if "use_8bit_adam" not in data and mapped[1] is not None:
                values["use_8bit_adam"] = mapped[1]
        else:  # kept as written: validation names the choices
            coerce_into(values, _RUN_FIELDS["optimizer"], name, "optimizer", problems)
    if data.get("use_lora_extended") is True and "lora_type" not in data:
        # The extension's "Lora Extended" adds LoRA to the ResNet convolutions at the UNet rank.
        values["lora_type"] = "LoCon"
        if "lora_conv_rank" not in data:
            rank = values.get("lora_unet_rank", data.get("lora_unet_rank"))
            if isinstance(rank, int) and not isinstance(rank, bool):
                values["lora_conv_rank"] = rank
        notes.append("read the extension's use_lora_extended as Lora Type LoCon (convolutions "
                     "at the UNet rank)")
    if "use_concepts" in data and not data.get("use_concepts") and values.get("concepts_path"):
        notes.append("the extension's use_concepts is off: its concepts_path "
                     f"{values['concepts_path']!r} is not used")
        values["concepts_path"] = ""


def per_image_total(per_image: int, values: dict[str, Any], label: str,
                    notes: list[str]) -> int:
    """The extension's ``num_class_images_per`` counts per instance image; ours is a total."""
    text = values.get("instance_data_dir", "").strip()
    folder = Path(text).expanduser()
    if text and folder.is_dir():
        count = len(list_image_files(folder))
        total = per_image * count
        notes.append(f"{label}: num_class_images_per {per_image} x {count} instance images = "
                     f"num_class_images {total}")
        return total
    notes.append(f"{label}: its instance folder {folder} is missing, so num_class_images_per "
                 f"{per_image} could not be multiplied by the image count; set num_class_images")
    return per_image
