"""Shared fixtures: the tiny model and the demo data, built once per test session."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from config_helpers import make_images

from colab_dreambooth.config.concept import Concept
from colab_dreambooth.config.settings import DreamBoothConfig
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


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny-model work on one torch thread: its hundreds of tiny matrices lose
    more to OpenMP hand-offs than they gain, and on a busy 2-core machine that costs seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if anything tries to load a model (checks must come first)."""
    import colab_dreambooth.models.loading as models
    import colab_dreambooth.training.train as train

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(train, "load_components", refuse)
    monkeypatch.setattr(models, "load_components", refuse)


@pytest.fixture
def instance_dir(tmp_path) -> Path:
    return make_images(tmp_path / "instance", 3)


@pytest.fixture
def valid_config(instance_dir, tmp_path) -> DreamBoothConfig:
    """A config that passes validation: the tiny model and an existing instance folder."""
    return DreamBoothConfig(
        model_name="valid",
        pretrained_model_name_or_path="tiny",
        models_root=str(tmp_path / "models"),
        max_train_steps=10,
        concepts_list=[Concept(instance_prompt="photo of sks dog", class_prompt="photo of a dog",
                               instance_token="sks", class_token="dog",
                               instance_data_dir=str(instance_dir), num_class_images=10)],
    )
