"""Notebook 03's force switch: a run the disk plan refuses starts when it is ticked."""

from __future__ import annotations

import pytest

from colab_dreambooth.runtime.device import DeviceInfo
from colab_dreambooth.training import space
from colab_dreambooth.training.space import DiskSpaceError
from widgets.app import TrainApp

pytestmark = pytest.mark.usefixtures("one_thread")


def test_force_switch_starts_a_refused_run(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(space, "free_space", lambda folder: 1000)  # a full disk, to the plan
    config = tiny_config.copy(max_train_steps=2, train_text_encoder=False)
    app = TrainApp(config, params_path=tmp_path / "params.json", device=DeviceInfo.cpu())
    assert app.force.value is False and app.force in app.widget.children
    with pytest.raises(DiskSpaceError):
        app.train(background=False)
    assert "will not fit" in app.describe_result()
    app.force.value = True
    result = app.train(background=False)
    assert result.steps == 2
