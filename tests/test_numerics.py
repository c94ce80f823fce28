"""TF32, deterministic mode and the half model (full fp16)."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from safetensors.torch import load_file

from colab_dreambooth.config.validation import validate
from colab_dreambooth.runtime.device import DeviceInfo
from colab_dreambooth.training.numerics import (
    allow_fp16_gradient_unscale,
    apply_numerics,
    half_model_dtype,
)
from colab_dreambooth.training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _flags():
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
            torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def test_options_off_change_nothing():
    before = _flags()
    numerics = apply_numerics(tf32=False, deterministic=False)
    assert _flags() == before and not numerics.saved and not numerics.env


def test_tf32_is_set_during_the_run_and_restored(tiny_config):
    before = _flags()
    seen = []
    train(tiny_config.copy(max_train_steps=1, allow_tf32=True), progress=False,
          on_step=lambda *a: seen.append(_flags()[:2]))
    assert seen == [(True, True)]
    assert _flags() == before


def test_deterministic_runs_are_bit_identical(tiny_config):
    before = _flags()
    seen = []
    config = tiny_config.copy(max_train_steps=2, deterministic=True)
    a = train(config.copy(model_name="a"), progress=False, on_step=lambda *x: seen.append(_flags()))
    b = train(config.copy(model_name="b"), progress=False)
    assert seen[0][2:] == (True, False, True, os.environ.get("CUBLAS_WORKSPACE_CONFIG")
                           or ":4096:8")
    assert a.losses == b.losses
    wa = load_file(next((a.model_dir / "unet").glob("*.safetensors")))
    wb = load_file(next((b.model_dir / "unet").glob("*.safetensors")))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _flags() == before


def test_half_model_dtype():
    assert half_model_dtype(False, "fp16") is None
    assert half_model_dtype(True, "fp16") is torch.float16
    assert half_model_dtype(True, "bf16") is torch.bfloat16


def test_half_model_on_the_cpu_warns_and_trains_in_fp32(tiny_config, caplog):
    with caplog.at_level(logging.WARNING):
        result = train(tiny_config.copy(max_train_steps=1, full_fp16=True,
                                        mixed_precision="fp16"), progress=False)
    assert "Half model needs a GPU" in caplog.text
    unet = load_file(next((result.model_dir / "unet").glob("*.safetensors")))
    assert all(v.dtype == torch.float32 for v in unet.values())


def test_half_model_needs_mixed_precision_on_a_gpu(tiny_config):
    gpu = DeviceInfo("cuda", "Tesla T4", memory_gb=15.0, bf16=False, count=1)
    config = tiny_config.copy(use_cpu=False, full_fp16=True, mixed_precision="no")
    problems = [p for p in validate(config, gpu) if p.where == "full_fp16"]
    assert len(problems) == 1 and "Mixed precision" in problems[0].message
    assert not [p for p in validate(config.copy(mixed_precision="fp16"), gpu)
                if p.where == "full_fp16"]


def test_fp16_gradients_can_be_unscaled_for_the_half_model():
    """torch's scaler refuses fp16 gradients; the half model's patch lets it unscale them."""
    class Accelerator:  # the one attribute the patch touches
        scaler = torch.amp.GradScaler("cpu", init_scale=8.0)

    w = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = torch.optim.SGD([w], lr=0.1)
    Accelerator.scaler.scale((w.float() ** 2).sum()).backward()
    with pytest.raises(ValueError, match="FP16"):
        Accelerator.scaler.unscale_(opt)
    opt.zero_grad()
    accelerator = Accelerator()
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    allow_fp16_gradient_unscale(accelerator)
    accelerator.scaler.scale((w.float() ** 2).sum()).backward()
    accelerator.scaler.unscale_(opt)
    assert torch.equal(w.grad, torch.full((4,), 2.0, dtype=torch.float16))
    accelerator.scaler.step(opt)
    assert w.dtype == torch.float16 and torch.allclose(w.float(), torch.full((4,), 0.8),
                                                       atol=1e-3)


def test_half_model_warns_about_fp16_optimizer_state(caplog):
    from colab_dreambooth.training.numerics import warn_fp16_optimizer_state
    from colab_dreambooth.training.optim import make_optimizer

    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))

    def opt(name):
        return make_optimizer([{"params": [w], "lr": 1.0}], name, use_8bit=False,
                              on_cuda=False, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)

    with caplog.at_level(logging.WARNING):
        assert warn_fp16_optimizer_state(opt("AdamW"), torch.float16)
        assert "state in fp16" in caplog.text
        assert not warn_fp16_optimizer_state(opt("Adafactor"), torch.float16)
        assert not warn_fp16_optimizer_state(opt("Lion"), torch.float16)
        assert not warn_fp16_optimizer_state(opt("AdamW"), torch.bfloat16)
        assert not warn_fp16_optimizer_state(opt("AdamW"), None)
