"""Helpers shared by the configuration tests (test_fields, test_params, test_extension_import,
test_validation): small real images, JSON files, problem lookups. Their fixtures
(``instance_dir``, ``valid_config``) are in conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from colab_dreambooth.config.params import load_params
from colab_dreambooth.errors import ConfigError, Problem


def make_images(folder: Path, count: int, size: int = 16) -> Path:
    """``count`` small real PNGs (plus a caption and a non-image that must not count)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (size, size), (40 * i % 256, 90, 200)).save(folder / f"img_{i}.png")
    (folder / "img_0.txt").write_text("a photo of sks dog", encoding="utf-8")
    (folder / "notes.md").write_text("not an image", encoding="utf-8")
    return folder


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=4), encoding="utf-8")
    return path


def wheres(problems) -> list[str]:
    return [p.where for p in problems]


def only_problem(problems, where: str) -> Problem:
    """The one problem at ``where`` (and assert there is exactly one there)."""
    found = [p for p in problems if p.where == where]
    assert len(found) == 1, f"expected one problem at {where!r}, got {problems}"
    return found[0]


def load_error(tmp_path: Path, data, name: str = "params.json") -> ConfigError:
    path = write_json(tmp_path / name, data)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    return info.value
