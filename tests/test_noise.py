"""Offset noise, min-SNR-gamma weighting and the training noise scheduler."""

from __future__ import annotations

import pytest
import torch

from colab_dreambooth.config.settings import NOISE_SCHEDULERS
from colab_dreambooth.models.loading import load_components
from colab_dreambooth.training.noise import (
    add_noise,
    make_noise_scheduler,
    min_snr_weights,
    sample_noise,
    velocity,
)
from colab_dreambooth.training.step import dreambooth_loss
from colab_dreambooth.training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parts():
    return load_components("tiny")


def _zero_unet(x, t, s):
    return type("Out", (), {"sample": torch.zeros_like(x)})()


def test_offset_noise_shifts_each_channel_mean():
    latents = torch.zeros(64, 4, 32, 32)
    torch.manual_seed(0)
    plain = sample_noise(latents, 0.0)
    torch.manual_seed(0)
    offset = sample_noise(latents, 0.5)
    # Per image and channel the mean of plain noise is ~N(0, 1/1024); offset adds N(0, 0.25).
    plain_means, offset_means = plain.mean(dim=(2, 3)), offset.mean(dim=(2, 3))
    assert plain_means.std() < 0.06
    assert 0.4 < offset_means.std() < 0.6
    # the offset is one value per image and channel: what remains is the plain noise
    assert torch.allclose(offset - offset_means[..., None, None],
                          plain - plain_means[..., None, None], atol=1e-5)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_formula(parts, kind):
    sched = make_noise_scheduler("DDPM", {**parts.noise_scheduler.config, "prediction_type": kind})
    t = torch.tensor([0, 10, 100, 500, 999])
    a = sched.alphas_cumprod[t].double()
    snr = a / (1 - a)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + (kind == "v_prediction"))
    assert torch.allclose(min_snr_weights(sched, t, 5.0).double(), expected, rtol=1e-5)
    # low-noise (high-SNR) steps are weighted down; noisy steps keep weight ~1 (epsilon)
    weights = min_snr_weights(sched, t, 5.0)
    assert weights[0] < 0.01 and weights[-1] == pytest.approx(1.0 if kind == "epsilon" else
                                                              float(snr[-1] / (snr[-1] + 1)),
                                                              rel=1e-4)


def test_min_snr_gamma_weights_each_row_of_the_loss(parts):
    sched = parts.noise_scheduler
    latents = torch.randn(4, 4, 8, 8)
    states = torch.zeros(4, 77, 32)
    torch.manual_seed(5)
    loss = dreambooth_loss(_zero_unet, sched, latents, states, 2, 0.5, min_snr_gamma=0.5)
    torch.manual_seed(5)
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (4,))
    rows = noise.pow(2).mean(dim=(1, 2, 3)) * min_snr_weights(sched, t, 0.5)
    assert loss.item() == pytest.approx((rows[:2].mean() + 0.5 * rows[2:].mean()).item(),
                                        rel=1e-5)
    torch.manual_seed(5)
    plain = dreambooth_loss(_zero_unet, sched, latents, states, 2, 0.5)
    assert plain.item() != pytest.approx(loss.item())


@pytest.mark.parametrize("name", NOISE_SCHEDULERS)
def test_noise_schedulers_follow_the_models_schedule(parts, name):
    config = {**parts.noise_scheduler.config, "prediction_type": "v_prediction"}
    sched = make_noise_scheduler(name, config)
    assert type(sched).__name__.startswith(name)
    assert sched.config.prediction_type == "v_prediction"  # from the model's config
    ddpm = make_noise_scheduler("DDPM", config)
    x, n = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    assert torch.equal(add_noise(sched, x, n, t), ddpm.add_noise(x, n, t))
    assert torch.allclose(velocity(sched, x, n, t), ddpm.get_velocity(x, n, t), atol=1e-6)


def test_noise_options_act_in_training(tiny_config):
    base = tiny_config.copy(max_train_steps=3, train_text_encoder=False)
    losses = {}
    for label, changes in {"default": {}, "deis": {"noise_scheduler": "DEIS"},
                           "offset": {"offset_noise": 0.5},
                           "min_snr": {"min_snr_gamma": 1.0}}.items():
        losses[label] = train(base.copy(model_name=label, **changes), progress=False).losses
    assert losses["deis"] == losses["default"]  # the same noise, as its help says
    assert losses["offset"] != losses["default"]
    # weights <= 1: min-SNR lowers every step's loss
    assert all(m < d for m, d in zip(losses["min_snr"], losses["default"]))
