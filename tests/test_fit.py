"""Fitting a run to the GPU before any model loads: blank fields lowered with reasons, the
user's own over-budget fields refused with each fix's estimate, ``force``, ``env --gpu``."""

from __future__ import annotations

import logging

import pytest
import torch

from colab_dreambooth import cli
from colab_dreambooth.config.concept import Concept
from colab_dreambooth.config.params import save_params
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.errors import ConfigError
from colab_dreambooth.runtime.device import DeviceInfo, gpu_by_name
from colab_dreambooth.training.fit import GpuMemoryError, enforce, plan_memory
from colab_dreambooth.training.memory import SD15
from colab_dreambooth.training.optim import make_optimizer

T4 = DeviceInfo("cuda", "Tesla T4", 14.7, False, 1, (7, 5), free_memory_gb=14.6)
RTX_3070 = DeviceInfo("cuda", "NVIDIA GeForce RTX 3070", 7.8, True, 1, (8, 6))
COLAB = {"bitsandbytes": False, "xformers": False}  # Colab's package set
WITH_BNB = {"bitsandbytes": True, "xformers": False}
PRIOR = [Concept(instance_prompt="photo of sks dog", class_prompt="photo of a dog",
                 instance_data_dir="/data/dog", num_class_images=100)]


def sd15(**changes) -> DreamBoothConfig:
    return DreamBoothConfig(concepts_list=PRIOR, **changes)


def test_t4_without_bitsandbytes_freezes_the_text_encoder_and_says_why():
    plan = plan_memory(sd15(), T4, packages=COLAB, sizes=SD15)
    assert plan.config.use_8bit_adam is False and plan.config.train_text_encoder is False
    assert plan.fits and plan.estimate.total_gb <= T4.free_memory_gb
    reasons = {c.field: c.reason for c in plan.choices}
    assert "bitsandbytes does not import" in reasons["use_8bit_adam"]
    assert "lowered to fit" in reasons["train_text_encoder"] and "15.8 to 13.9" in reasons[
        "train_text_encoder"]
    text = str(plan)
    assert "bitsandbytes missing" in text and "train_text_encoder = off (15.8 -> 13.9 GB)" in text
    # With bitsandbytes the preset's own choices fit as they are.
    plan = plan_memory(sd15(), T4, packages=WITH_BNB, sizes=SD15)
    assert plan.config.use_8bit_adam and plan.config.train_text_encoder and not plan.lowered
    assert plan.estimate.total_gb == pytest.approx(10.3, abs=0.05)


def test_the_users_own_fields_are_refused_with_each_fix_and_its_estimate(caplog):
    plan = plan_memory(sd15(train_text_encoder=True), T4, packages=COLAB, sizes=SD15)
    assert not plan.fits and plan.config.train_text_encoder is True
    with pytest.raises(GpuMemoryError) as caught:
        enforce(plan)
    error = caught.value
    assert isinstance(error, ConfigError)  # the CLI prints it as one message
    message = str(error)
    assert "15.8 GB" in message and "Tesla T4 has 14.6 GB usable" in message
    assert "train_text_encoder: turn off Train Text Encoder: about 13.9 GB (fits)" in message
    assert "use_8bit_adam: install bitsandbytes" in message and "about 10.3 GB (fits)" in message
    assert "use_lora: turn on Use LORA" in message and "force" in message
    fields = {p.where for p in error.problems}
    assert {"train_text_encoder", "use_lora", "optimizer", "use_8bit_adam"} <= fields
    with caplog.at_level(logging.WARNING, logger="colab_dreambooth"):
        enforce(plan, force=True)  # an expert's choice: a warning only
    assert "Forced" in caplog.text


def test_the_smallest_gpus_are_told_to_use_lora():
    plan = plan_memory(sd15(), RTX_3070, packages=COLAB, sizes=SD15)
    assert not plan.fits  # full fine-tuning of SD 1.5 does not fit 8 GB
    lora = [f for f in plan.fixes if f.fields == ("use_lora",)]
    assert lora and lora[0].estimate_gb < RTX_3070.memory_gb
    assert plan_memory(sd15(use_lora=True), RTX_3070, packages=COLAB, sizes=SD15).fits


def test_blank_batch_size_is_lowered_before_the_text_encoder():
    a100 = gpu_by_name("A100 40GB")
    small = DeviceInfo("cuda", a100.name, 16.0, True, 1, (8, 0))  # e.g. a capped A100
    plan = plan_memory(sd15(use_8bit_adam=True), small, packages=WITH_BNB, sizes=SD15)
    changed = [text.split(" = ")[0] for text in plan.lowered]
    assert changed[0] == "gradient_checkpointing" or changed[0] == "train_batch_size"
    assert plan.fits and plan.config.train_text_encoder  # fitted without freezing CLIP


def test_train_refuses_before_any_model_is_loaded(tiny_config, monkeypatch):
    from colab_dreambooth.training import train as train_module

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(train_module, "load_components", no_loading)
    gpu = DeviceInfo("cuda", "Tiny GPU", 0.2, False, 1, (7, 5))
    with pytest.raises(GpuMemoryError, match="Tiny GPU has 0.2 GB usable"):
        train_module.train(tiny_config.copy(gradient_checkpointing=False, use_cpu=False,
                                            mixed_precision=None), device=gpu,
                           progress=False)


def test_fallback_warning_quotes_the_estimators_figure(caplog, monkeypatch):
    from colab_dreambooth.runtime import packages

    monkeypatch.setattr(packages, "importable", lambda name: False)
    weights = [torch.nn.Parameter(torch.empty(SD15.unet + SD15.text_encoder, device="meta"))]
    with caplog.at_level(logging.WARNING, logger="colab_dreambooth"):
        make_optimizer([{"params": weights, "lr": 1e-6}], use_8bit=True, on_cuda=True,
                       betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8)
    assert "5.5 GB more GPU memory" in caplog.text


def test_env_plans_for_a_gpu_that_is_not_here(tmp_path, capsys):
    path = save_params(sd15(train_text_encoder=True), tmp_path / "p.json")
    assert cli.main(["env", "--config", str(path), "--gpu", "Tesla T4"]) == 0
    out = capsys.readouterr().out
    assert "GPU planned:  Tesla T4" in out and "Preset: T4" in out
    assert "Estimated peak memory" in out and "usable on the GPU" in out
    assert ("It will not fit" in out) != ("bitsandbytes imports" in out)
    assert cli.main(["env", "--gpu", "Voodoo 3"]) == 1
    assert "unknown GPU 'Voodoo 3'" in capsys.readouterr().err


@pytest.mark.parametrize("name, memory", [("Tesla T4", 14.7), ("L4", 22.0),
                                          ("A100 80GB", 79.1), ("NVIDIA A100-SXM4-40GB", 39.4)])
def test_gpus_by_name(name, memory):
    assert gpu_by_name(name).memory_gb == memory


def test_torch_adamw_is_fused():
    """torch's default (foreach) AdamW step holds a temporary the size of the weights, which
    the estimate does not count: on a GPU the fused kernel runs instead. On the CPU too where
    torch has the kernel (2.4+; 4x faster than foreach there), else foreach."""
    weights = [torch.nn.Parameter(torch.zeros(3))]
    gpu = make_optimizer([{"params": weights, "lr": 1e-3}], use_8bit=False, on_cuda=True,
                         betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8)
    cpu = make_optimizer([{"params": weights, "lr": 1e-3}], use_8bit=False, on_cuda=False,
                         betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8)
    assert gpu.defaults["fused"] is True
    assert cpu.defaults["fused"] is True or cpu.defaults["foreach"] is True
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4):
        assert cpu.defaults["fused"] is True


def test_the_gpus_free_memory_is_the_budget(monkeypatch):
    """Another notebook (or an earlier run in this kernel) holding GPU memory leaves less for
    this run; what PyTorch's own cache holds unused still counts as free."""
    import types

    from colab_dreambooth.runtime.device import detect_device

    props = types.SimpleNamespace(name="Tesla T4", total_memory=15 * 2**30, major=7, minor=5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (9 * 2**30, 15 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: 2 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: 2**30)
    device = detect_device()
    assert device.free_memory_gb == 10.0 and device.usable_memory_gb == 10.0
    plan = plan_memory(sd15(), device, packages=WITH_BNB, sizes=SD15)
    assert plan.budget_gb == 10.0 and "of 10.0 GB usable" in str(plan.estimate)
    assert plan.fits and plan.config.train_text_encoder is False  # 10.3 GB did not fit 10
