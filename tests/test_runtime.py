"""Runtime detection: the notebook service from its environment, its folders, Drive, the GPU."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from colab_dreambooth.runtime import environment as runtime
from colab_dreambooth.runtime.device import DeviceInfo, detect_device
from colab_dreambooth.runtime.environment import (
    Runtime,
    detect_platform,
    detect_runtime,
    mount_drive,
    mount_drive_if_needed,
)
from colab_dreambooth.training.fit import environment_report


@pytest.mark.parametrize("env, platform", [
    ({}, "local"),
    ({"COLAB_RELEASE_TAG": "release-colab_20251120"}, "colab"),
    ({"COLAB_GPU": "1"}, "colab"),
    ({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, "kaggle"),
    ({"KAGGLE_URL_BASE": "https://www.kaggle.com"}, "kaggle"),
    ({"PAPERSPACE_NOTEBOOK_REPO_ID": "abc123"}, "gradient"),
    ({"PAPERSPACE_CLUSTER_ID": "cl1"}, "gradient"),
    ({"KAGGLE_KERNEL_RUN_TYPE": ""}, "local"),  # set but empty: not Kaggle
    # Kaggle's image is built on Colab's: both sets of variables are there.
    ({"COLAB_RELEASE_TAG": "release-colab_20251120", "KAGGLE_KERNEL_RUN_TYPE": "Interactive",
      "KAGGLE_URL_BASE": "https://www.kaggle.com"}, "kaggle"),
    ({"COLAB_GPU": "1", "PAPERSPACE_NOTEBOOK_ID": "n1"}, "gradient"),
])
def test_platform_from_environment_variables(tmp_path, env, platform):
    assert detect_platform(env, root=tmp_path) == platform


def test_default_folders_per_platform(tmp_path):
    colab = detect_runtime({"COLAB_GPU": "1"}, root=tmp_path)
    assert colab == Runtime("colab", tmp_path / "content", None)
    assert colab.name == "Google Colab" and colab.persistent_dir == tmp_path / "content"
    (tmp_path / "content" / "drive" / "MyDrive").mkdir(parents=True)
    mounted = detect_runtime({"COLAB_GPU": "1"}, root=tmp_path)
    assert mounted.drive_dir == tmp_path / "content" / "drive" / "MyDrive"
    assert mounted.persistent_dir == mounted.drive_dir

    kaggle = detect_runtime({"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, root=tmp_path)
    assert kaggle.work_dir == tmp_path / "kaggle" / "working" and kaggle.drive_dir is None
    gradient = detect_runtime({"PAPERSPACE_NOTEBOOK_ID": "n1"}, root=tmp_path)
    assert gradient.work_dir == tmp_path / "notebooks" and gradient.name == "Paperspace Gradient"
    local = detect_runtime({}, root=tmp_path, cwd=tmp_path / "here")
    assert local == Runtime("local", tmp_path / "here") and local.name == "local machine"


def test_kaggle_is_also_known_by_its_folders(tmp_path):
    (tmp_path / "kaggle" / "working").mkdir(parents=True)
    assert detect_platform({}, root=tmp_path) == "local"  # /kaggle/working alone is not enough
    (tmp_path / "kaggle" / "input").mkdir()
    assert detect_platform({}, root=tmp_path) == "kaggle"


def test_kaggle_with_colab_variables_and_google_colab_importable(tmp_path, monkeypatch):
    """On Kaggle google.colab imports and COLAB_RELEASE_TAG is set: still Kaggle, by its
    variables or by its folders."""
    monkeypatch.setattr(runtime, "_colab_importable", lambda: True)
    for name in runtime.KAGGLE_VARIABLES + runtime.GRADIENT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab_20251120")
    assert detect_platform(root=tmp_path) == "colab"
    (tmp_path / "kaggle" / "working").mkdir(parents=True)
    (tmp_path / "kaggle" / "input").mkdir()
    assert detect_platform(root=tmp_path) == "kaggle"
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert detect_runtime(root=tmp_path).work_dir == tmp_path / "kaggle" / "working"


def test_blank_work_dir_is_the_runtimes_persistent_place(tmp_path, monkeypatch):
    from colab_dreambooth.runtime.environment import default_work_dir, resolve_work_dir

    colab = detect_runtime({"COLAB_GPU": "1"}, root=tmp_path)
    assert default_work_dir(colab) == runtime.DRIVE_MOUNT / "MyDrive" / "dreambooth"
    kaggle = detect_runtime({"KAGGLE_URL_BASE": "x", "COLAB_GPU": "1"}, root=tmp_path)
    assert default_work_dir(kaggle) == tmp_path / "kaggle" / "working" / "dreambooth"
    gradient = detect_runtime({"PAPERSPACE_NOTEBOOK_ID": "n"}, root=tmp_path)
    assert default_work_dir(gradient) == tmp_path / "notebooks" / "dreambooth"
    local = detect_runtime({}, root=tmp_path, cwd=tmp_path / "here")
    assert default_work_dir(local) == tmp_path / "here" / "dreambooth"

    # Here (a local machine): blank is ./dreambooth, created by nobody yet.
    for name in runtime.COLAB_VARIABLES + runtime.KAGGLE_VARIABLES + runtime.GRADIENT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime, "_colab_importable", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert resolve_work_dir("  ") == tmp_path / "dreambooth"
    assert not (tmp_path / "dreambooth").exists()
    assert resolve_work_dir(str(tmp_path / "w")) == tmp_path / "w"


def test_blank_work_dir_on_colab_mounts_drive_or_says_why_not(tmp_path, monkeypatch):
    from colab_dreambooth.runtime.environment import DriveNotMounted, resolve_work_dir

    drive = tmp_path / "drive"
    monkeypatch.setattr(runtime, "DRIVE_MOUNT", drive)
    for name in runtime.KAGGLE_VARIABLES + runtime.GRADIENT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLAB_RELEASE_TAG", "test")
    answers = []

    def mount(path):
        if answers.pop(0) == "refuse":
            raise ValueError("mount failed")
        (drive / "MyDrive").mkdir(parents=True)

    fake_drive = types.SimpleNamespace(mount=mount)
    monkeypatch.setitem(sys.modules, "google.colab", types.SimpleNamespace(drive=fake_drive))
    answers.append("refuse")
    with pytest.raises(DriveNotMounted, match="Allow access"):
        resolve_work_dir("")
    assert not drive.exists()  # nothing was created under the mount point
    answers.append("allow")
    assert resolve_work_dir("") == drive / "MyDrive" / "dreambooth"


def test_drive_is_mounted_only_on_colab(monkeypatch, tmp_path):
    mounted = []
    fake_drive = types.SimpleNamespace(mount=lambda path: mounted.append(path))
    monkeypatch.setitem(sys.modules, "google.colab", types.SimpleNamespace(drive=fake_drive))
    monkeypatch.setitem(sys.modules, "google.colab.drive", fake_drive)
    monkeypatch.setattr(runtime, "DRIVE_MOUNT", tmp_path / "drive")
    for name in runtime.COLAB_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime, "_colab_importable", lambda: False)

    assert mount_drive() is None  # not Colab: nothing to mount
    with pytest.raises(runtime.DriveNotMounted, match="only available on Colab"):
        mount_drive_if_needed(str(tmp_path / "drive" / "MyDrive" / "x"))
    assert mounted == [] and not (tmp_path / "drive").exists()

    monkeypatch.setenv("COLAB_RELEASE_TAG", "test")
    assert mount_drive_if_needed("/content/data") is False  # no path needs Drive
    assert mounted == []
    # Not from a background thread (Colab's sign-in needs the cell): refused, nothing made.
    import threading
    refused = []
    thread = threading.Thread(target=lambda: refused.append(_raises(
        lambda: mount_drive_if_needed(str(tmp_path / "drive" / "MyDrive" / "x")))))
    thread.start()
    thread.join()
    assert refused == [True] and mounted == []
    assert mount_drive_if_needed(str(tmp_path / "drive" / "MyDrive" / "x")) is True
    assert mounted == [str(tmp_path / "drive")]
    (tmp_path / "drive" / "MyDrive").mkdir(parents=True)
    assert mount_drive() == tmp_path / "drive" / "MyDrive"
    assert len(mounted) == 1  # already mounted: not asked again


def test_device_abilities():
    t4 = DeviceInfo("cuda", "Tesla T4", 14.7, False, 1, (7, 5))
    a100 = DeviceInfo("cuda", "NVIDIA A100-SXM4-40GB", 39.4, True, 1, (8, 0))
    assert not t4.tf32 and not t4.flash_attention
    assert a100.tf32 and a100.flash_attention
    cpu = DeviceInfo.cpu()
    assert cpu.kind == "cpu" and not cpu.flash_attention and cpu.capability == (0, 0)


def test_detect_device_reports_bf16_from_the_compute_capability(monkeypatch):
    import torch

    props = types.SimpleNamespace(name="Tesla T4", total_memory=15 * 2**30, major=7, minor=5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    # Recent torch says True on a T4 (bf16 emulated, slow): the capability decides instead.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert detect_device() == DeviceInfo("cuda", "Tesla T4", 15.0, False, 2, (7, 5))
    props.name, props.major, props.minor = "NVIDIA L4", 8, 9
    assert detect_device().bf16 is True


def test_environment_report_names_everything(tmp_path):
    t4 = DeviceInfo("cuda", "Tesla T4", 14.7, False, 2, (7, 5))
    text = environment_report(device=t4, runtime=Runtime("colab", Path("/content")))
    assert "Google Colab" in text and "/content" in text and "not mounted" in text
    assert "Tesla T4 x2, 14.7 GB, compute capability 7.5, bf16 no" in text
    assert "torch " in text and "bitsandbytes" in text and "xformers" in text
    assert "Preset: T4" in text and "Estimated peak memory" in text


def _raises(action) -> bool:
    try:
        action()
    except runtime.DriveNotMounted:
        return True
    return False
