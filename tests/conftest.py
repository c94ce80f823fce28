"""Shared fixtures: the tiny model and the demo data, built once per test session."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from colab_dreambooth.demo import demo_config, make_demo_data


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A folder holding the demo's instance and class images (read-only for tests)."""
    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root / "data")
    return root


@pytest.fixture
def tiny_config(demo_root, tmp_path):
    """A fast config on the tiny model and the demo data, writing into ``tmp_path``."""
    config = demo_config(demo_root, steps=6)
    return config.copy(models_root=str(tmp_path), model_name="test-model")


@pytest.fixture(autouse=True)
def _quiet_logs():
    logging.getLogger("colab_dreambooth").setLevel(logging.INFO)
    yield
