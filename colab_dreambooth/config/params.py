"""Parameters JSON: save and load a :class:`DreamBoothConfig`, ours or the extension's.

Our JSON is flat, keyed by the field names of :mod:`colab_dreambooth.config.settings`, with
``concepts_list`` as a list of concept objects. The AUTOMATIC1111 extension's ``db_config.json``
(both its late-2022 and its later generations) and its ``concepts_list`` files load through the
same path: its renamed keys are mapped, the keys it has and we do not use are ignored and
reported (:mod:`colab_dreambooth.config.extension_import` knows them), and any other key is an
error that suggests the closest valid name.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

from colab_dreambooth.config.concept import Concept
from colab_dreambooth.config.extension_import import (
    EXTENSION_ONLY_CONCEPT_KEYS,
    EXTENSION_ONLY_KEYS,
    RENAMED_KEYS,
    SPECIAL_KEYS,
    import_extension_specials,
    per_image_total,
    strip_db_prefix,
)
from colab_dreambooth.config.fields import FieldSpec, coerce_into, field_specs
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.errors import ConfigError, Problem
from colab_dreambooth.files import write_text_atomic
from colab_dreambooth.runtime.environment import mount_drive_if_needed

log = logging.getLogger(__name__)

RUN_FIELDS = field_specs(DreamBoothConfig)
CONCEPT_FIELDS = field_specs(Concept)

@dataclass
class LoadedParams:
    """A configuration read from JSON, with what the reader had to tell about it."""

    config: DreamBoothConfig
    ignored_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- saving
def params_to_dict(config: DreamBoothConfig) -> dict[str, Any]:
    """The JSON-ready parameters of ``config`` (every field, concepts as objects)."""
    data = {name: getattr(config, name) for name in RUN_FIELDS}
    data["concepts_list"] = [
        {name: getattr(c, name) for name in CONCEPT_FIELDS} for c in config.concepts_list]
    return data


def params_template() -> DreamBoothConfig:
    """Every field at its default plus one example concept to edit (``params FILE``): a
    newcomer sees every concept key and the shape of a working entry. Its folder
    ``my-photos`` is relative, so it means the folder beside the parameters file."""
    return DreamBoothConfig(concepts_list=[Concept(
        instance_prompt="photo of zwx dog", class_prompt="photo of a dog",
        instance_data_dir="my-photos", instance_token="zwx", class_token="dog",
        num_class_images=50)])


def save_params(config: DreamBoothConfig, path: str | os.PathLike) -> Path:
    """Write ``config`` as JSON to ``path`` atomically (a crash never leaves half a file)."""
    path = Path(path)
    mount_drive_if_needed(path)  # never a folder under an unmounted /content/drive
    write_text_atomic(path, json.dumps(params_to_dict(config), indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------- loading
def load_params(path: str | os.PathLike) -> DreamBoothConfig:
    """Read a parameters JSON (ours or the extension's ``db_config.json``).

    Keys that are missing take the defaults. Relative instance/class folders and
    ``concepts_path`` are taken relative to the file's own folder (not the current one).
    Raises :class:`ConfigError` listing every unknown key and wrong type at once; logs the
    extension keys it ignored.
    """
    loaded = read_params(path)
    for note in loaded.notes:
        log.warning("%s", note)
    return loaded.config


def read_params(path: str | os.PathLike) -> LoadedParams:
    """Like :func:`load_params`, returning the ignored keys and notes too."""
    path = Path(path)
    data = _read_json(path)
    if isinstance(data, list):  # a bare concepts_list file passed as parameters
        data = {"concepts_list": data}
    if not isinstance(data, dict):
        raise ConfigError([Problem(str(path), "expected a JSON object of parameters")])
    return params_from_dict(data, source=str(path), base_dir=path.parent)


def load_concepts(path: str | os.PathLike) -> list[Concept]:
    """Read a concepts list JSON (ours or the extension's). Relative folders in it are taken
    relative to the file, as the extension does."""
    path = Path(path)
    data = _read_json(path)
    if isinstance(data, dict) and "concepts_list" in data:
        data = data["concepts_list"]
    if not isinstance(data, list):
        raise ConfigError([Problem(str(path), "expected a JSON list of concept objects")])
    problems: list[Problem] = []
    notes: list[str] = []
    concepts = _concepts_from_list(data, problems, notes, base_dir=path.parent, where=str(path))
    if problems:
        raise ConfigError(problems)
    for note in notes:
        log.warning("%s", note)
    return concepts


def resolve_concepts(config: DreamBoothConfig) -> DreamBoothConfig:
    """A copy of ``config`` whose ``concepts_list`` holds the concepts of ``concepts_path``
    when that is set (the file then wins over the inline list, as in the extension)."""
    if not config.concepts_path.strip():
        return config
    path = Path(config.concepts_path).expanduser()
    if not path.is_file():
        raise ConfigError([Problem("concepts_path", f"the concepts file {path} does not exist: "
                                   "fix the path or clear it to use the inline concepts")])
    return config.copy(concepts_list=load_concepts(path))


def params_from_dict(data: dict[str, Any], *, source: str = "parameters",
                     base_dir: Path | None = None) -> LoadedParams:
    """Build a config from a parameters mapping; see :func:`load_params`. With ``base_dir``
    (the file's folder), relative data folders and ``concepts_path`` are taken relative to it."""
    problems: list[Problem] = []
    ignored: list[str] = []
    notes: list[str] = []
    values: dict[str, Any] = {}
    top_level_concept: dict[str, Any] = {}
    data = {strip_db_prefix(k): v for k, v in data.items()}

    for key, value in data.items():
        if key in RENAMED_KEYS and RENAMED_KEYS[key] not in data:
            notes.append(f"{source}: read the extension's '{key}' as '{RENAMED_KEYS[key]}'")
            key = RENAMED_KEYS[key]
        if key == "concepts_list":
            if value is None:
                value = []
            if not isinstance(value, list):
                problems.append(Problem("concepts_list", "expected a list of concept objects"))
                continue
            values[key] = _concepts_from_list(value, problems, notes, base_dir=base_dir)
        elif key in SPECIAL_KEYS:
            continue  # handled below, once every plain key is known
        elif key in RUN_FIELDS:
            coerce_into(values, RUN_FIELDS[key], value, key, problems)
        elif key in CONCEPT_FIELDS:
            top_level_concept[key] = value  # the extension's first files: one concept, flat
        elif key in EXTENSION_ONLY_KEYS or key in RENAMED_KEYS:
            ignored.append(key)
        else:
            problems.append(Problem(key, _unknown_key_message(key, RUN_FIELDS, RENAMED_KEYS)))

    if top_level_concept:
        if values.get("concepts_list") or any(p.where == "concepts_list" for p in problems):
            ignored += sorted(top_level_concept)
            notes.append(f"{source}: concept keys at the top level ("
                         f"{', '.join(sorted(top_level_concept))}) were ignored: "
                         "concepts_list is set")
        elif any(isinstance(top_level_concept.get(k), str) and top_level_concept[k].strip()
                 for k in ("instance_prompt", "instance_data_dir")):
            values["concepts_list"] = _concepts_from_list([top_level_concept], problems, notes,
                                                          base_dir=base_dir)
            notes.append(f"{source}: read the top-level concept keys of an early extension file "
                         "as concept 1")
        else:  # blank concept fields of an early file: nothing to train from them
            ignored += sorted(top_level_concept)
    import_extension_specials(data, values, problems, notes, ignored)
    if problems:
        raise ConfigError(problems)
    if ignored:
        notes.append(f"{source}: ignored {len(ignored)} extension key(s) this package does not "
                     f"use: {', '.join(sorted(ignored))}")
    if base_dir is not None:
        _resolve_relative_inputs(values, base_dir)
    config = DreamBoothConfig(**values)
    return LoadedParams(config, sorted(ignored), notes)


def _resolve_relative_inputs(values: dict[str, Any], base_dir: Path) -> None:
    """Relative input paths of a parameters file are relative to the file's own folder, so a
    file beside its photos works from any current folder. The base model only when such a
    path exists there: ``owner/name`` is also how a Hub id looks."""
    path = values.get("concepts_path", "")
    if isinstance(path, str) and path.strip() and not _is_absolute(path):
        values["concepts_path"] = str(base_dir / path)
    model = values.get("pretrained_model_name_or_path", "")
    if isinstance(model, str) and model.strip() and not _is_absolute(model) \
            and (base_dir / model).exists():
        values["pretrained_model_name_or_path"] = str(base_dir / model)


def _concepts_from_list(items: list[Any], problems: list[Problem], notes: list[str], *,
                        base_dir: Path | None, where: str = "concepts_list") -> list[Concept]:
    concepts = []
    ignored: set[str] = set()
    for number, item in enumerate(items, start=1):
        label = f"concept {number}"
        if not isinstance(item, dict):
            problems.append(Problem(label, f"{where}: expected a concept object"))
            continue
        values: dict[str, Any] = {}
        extension: dict[str, Any] = {}
        for key, value in item.items():
            key = strip_db_prefix(key)
            if key in CONCEPT_FIELDS:
                coerce_into(values, CONCEPT_FIELDS[key], value, f"{label} {key}", problems)
            elif key in EXTENSION_ONLY_CONCEPT_KEYS:
                extension[key] = value
                if key != "num_class_images_per":
                    ignored.add(key)
            else:
                problems.append(Problem(f"{label} {key}",
                                        _unknown_key_message(key, CONCEPT_FIELDS)))
        if base_dir is not None:
            for key in ("instance_data_dir", "class_data_dir"):
                folder = values.get(key, "")
                if folder and not _is_absolute(folder):
                    values[key] = str(base_dir / folder)
        per_image = extension.get("num_class_images_per")
        # Files of early 2023 hold both keys, the total zeroed once converted to per-image.
        if (not values.get("num_class_images") and isinstance(per_image, int)
                and not isinstance(per_image, bool) and per_image > 0):
            values["num_class_images"] = per_image_total(per_image, values, label, notes)
        concepts.append(Concept(**values))
    if ignored:
        notes.append(f"{where}: ignored concept key(s) this package does not use: "
                     f"{', '.join(sorted(ignored))}")
    return concepts


def _is_absolute(folder: str) -> bool:
    r"""Absolute here or on Windows (``E:\dev\...``, ``\\server\share``, ``\dev``): such a
    path from another machine must not be glued onto the concepts file's folder."""
    return Path(folder).expanduser().is_absolute() or PureWindowsPath(folder).is_absolute() \
        or folder.startswith("\\")


def _unknown_key_message(key: str, fields: dict[str, FieldSpec],
                         renamed: dict[str, str] | None = None) -> str:
    renamed = renamed or {}
    names = list(fields) + list(renamed)
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f"unknown key '{key}': did you mean '{renamed.get(close[0], close[0])}'?"
    return f"unknown key '{key}': not a setting of colab-dreambooth; remove it"


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError([Problem(str(path), "file not found")]) from None
    except UnicodeDecodeError:
        raise ConfigError([Problem(str(path), "not UTF-8 text: save it as UTF-8 JSON")]) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError([Problem(str(path), f"not valid JSON (line {exc.lineno}, column "
                                   f"{exc.colno}: {exc.msg})")]) from None

