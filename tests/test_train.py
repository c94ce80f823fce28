"""The training loop on the real tiny model and real image files."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from colab_dreambooth.config.params import load_params
from colab_dreambooth.config.presets import PRESET_FIELDS, apply_preset
from colab_dreambooth.data.dataset import DataError
from colab_dreambooth.errors import ConfigError
from colab_dreambooth.models.attention import set_memory_attention
from colab_dreambooth.models.loading import load_components
from colab_dreambooth.models.text_encoding import chunked_input_ids
from colab_dreambooth.models.tiny import tiny_model_path
from colab_dreambooth.runtime.device import DeviceInfo
from colab_dreambooth.training import train as train_module
from colab_dreambooth.training.optim import EMA, make_optimizer, plan_steps
from colab_dreambooth.training.step import dreambooth_loss
from colab_dreambooth.training.train import train

CPU = DeviceInfo.cpu()


def weights(folder: Path, part: str) -> dict[str, torch.Tensor]:
    files = sorted((folder / part).glob("*.safetensors"))
    assert files, f"no weights in {folder / part}"
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- arithmetic
@pytest.mark.parametrize("batches, accum, steps, epochs, expected", [
    (6, 1, None, 100, (6, 600, 100)),      # epochs x batches
    (6, 2, None, 10, (3, 30, 10)),         # accumulation divides the steps per epoch
    (7, 2, None, 10, (4, 40, 10)),         # a partial accumulation still makes a step
    (6, 1, 20, 100, (6, 20, 4)),           # steps win over epochs; epochs as many as needed
    (6, 1, 18, None, (6, 18, 3)),
    (1, 4, 5, None, (1, 5, 5)),
])
def test_plan_steps(batches, accum, steps, epochs, expected):
    plan = plan_steps(batches, accum, steps, epochs)
    assert (plan.steps_per_epoch, plan.total_steps, plan.epochs) == expected


def test_plan_steps_needs_steps_or_epochs():
    with pytest.raises(ValueError):
        plan_steps(3, 1, None, None)


# ----------------------------------------------------------------------------- the loss
@pytest.fixture(scope="module")
def parts():
    return load_components("tiny")


def _loss(parts, latents, states, n, weight, seed=0):
    torch.manual_seed(seed)
    return dreambooth_loss(parts.unet, parts.noise_scheduler, latents, states, n, weight)


def test_prior_loss_is_weighted_sum(parts):
    torch.manual_seed(1)
    latents = torch.randn(4, 4, 8, 8)
    states = torch.randn(4, 77, 32)
    with torch.no_grad():
        l0, l1, l2 = (_loss(parts, latents, states, 2, w).item() for w in (0.0, 1.0, 2.0))
        instance_only = _loss(parts, latents[:2], states[:2], 2, 1.0).item()
    assert l1 > l0 and l2 > l1
    assert l2 - l1 == pytest.approx(l1 - l0, rel=1e-5)  # linear in Prior Loss Weight
    assert instance_only != pytest.approx(l1)


def test_class_half_changes_the_gradient(parts):
    torch.manual_seed(2)
    latents = torch.randn(4, 4, 8, 8)
    states = torch.randn(4, 77, 32)
    grads = []
    for weight in (0.0, 1.0):
        parts.unet.zero_grad(set_to_none=True)
        _loss(parts, latents, states, 2, weight).backward()
        grads.append(torch.cat([p.grad.flatten() for p in parts.unet.parameters()]))
    parts.unet.zero_grad(set_to_none=True)
    assert torch.isfinite(grads[1]).all()
    assert not torch.allclose(grads[0], grads[1])


def test_v_prediction_target(parts):
    """A v-prediction model is trained towards the velocity, not the noise."""
    from diffusers import DDPMScheduler

    zero_unet = lambda x, t, s: type("Out", (), {"sample": torch.zeros_like(x)})()  # noqa: E731
    latents = torch.randn(2, 4, 8, 8)
    states = torch.zeros(2, 77, 32)
    losses = {}
    for kind in ("epsilon", "v_prediction"):
        sched = DDPMScheduler.from_config(parts.noise_scheduler.config, prediction_type=kind)
        torch.manual_seed(3)
        losses[kind] = dreambooth_loss(zero_unet, sched, latents, states, 2, 1.0).item()
        torch.manual_seed(3)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (2,))
        target = sched.get_velocity(latents, noise, t) if kind == "v_prediction" else noise
        assert losses[kind] == pytest.approx(target.pow(2).mean().item(), rel=1e-5)
    assert losses["epsilon"] != pytest.approx(losses["v_prediction"])


def tokenize(tokenizer, prompts, pad_tokens):
    """One 75-token chunk of ids, as the loop tokenizes a short prompt."""
    return chunked_input_ids(tokenizer, prompts, pad_tokens=pad_tokens)[:, 0]


def test_pad_tokens(parts):
    padded = tokenize(parts.tokenizer, ["a photo of zwx toy"], pad_tokens=True)
    unpadded = tokenize(parts.tokenizer, ["a photo of zwx toy", "toy"], pad_tokens=False)
    assert padded.shape == (1, 77)
    assert unpadded.shape[1] < 77
    long = tokenize(parts.tokenizer, ["word " * 200], pad_tokens=False)
    assert long.shape[1] == 77  # truncated to CLIP's 77 positions


# ----------------------------------------------------------------------------- fallbacks
def test_8bit_adam_falls_back_off_cuda(caplog):
    p = torch.nn.Parameter(torch.zeros(3))
    with caplog.at_level(logging.WARNING):
        opt = make_optimizer([{"params": [p], "lr": 1e-3}], use_8bit=True, on_cuda=False,
                             betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    assert type(opt) is torch.optim.AdamW
    assert "8-bit Adam needs a CUDA GPU" in caplog.text
    auto = make_optimizer([{"params": [p], "lr": 1e-3}], use_8bit=None, on_cuda=False,
                          betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    assert type(auto) is torch.optim.AdamW


def test_xformers_falls_back_to_sdpa(parts, caplog):
    with caplog.at_level(logging.WARNING):
        used = set_memory_attention(parts.unet, "xformers", on_cuda=False)
    assert used == "sdpa"
    assert "xformers needs a CUDA GPU" in caplog.text
    assert set_memory_attention(parts.unet, "default", on_cuda=False) == "sdpa"


def test_ema_warms_up_and_tracks():
    p = torch.nn.Parameter(torch.zeros(2))
    ema = EMA([p], max_decay=0.9999, device="cpu")
    with torch.no_grad():
        p.fill_(1.0)
    ema.update([p])  # decay (1+1)/(10+1) = 0.1818...
    assert ema.shadow[0][0].item() == pytest.approx(1 - 2 / 11)
    target = torch.nn.Parameter(torch.zeros(2))
    ema.copy_to([target])
    assert torch.equal(target.data, ema.shadow[0])


# ----------------------------------------------------------------------------- whole runs
def test_loss_falls_and_model_loads(tiny_config):
    from diffusers import StableDiffusionPipeline

    config = tiny_config.copy(max_train_steps=60)
    result = train(config, progress=False)
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert result.steps == 60 and len(result.losses) == 60
    assert last < 0.5 * first, (first, last)
    assert result.model_dir == config.model_dir / "model"
    # The saved folder is a diffusers pipeline, with the run's parameters beside it.
    pipe = StableDiffusionPipeline.from_pretrained(result.model_dir, safety_checker=None)
    image = pipe("a photo of zwx toy", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    # The saved parameters are what trained: blank (auto) fields as the preset filled them.
    assert load_params(result.model_dir / "params.json") == apply_preset(config, CPU)[0]
    assert not list(result.model_dir.parent.glob(".model.tmp-*"))  # no leftovers


def test_blank_fields_take_the_preset(tiny_config, caplog):
    config = tiny_config.copy(max_train_steps=2, **{name: None for name in PRESET_FIELDS})
    with caplog.at_level(logging.INFO, logger="colab_dreambooth"):
        result = train(config, progress=False)
    assert result.steps == 2
    assert "Preset: CPU" in caplog.text and "train_batch_size" in caplog.text
    assert "GPU memory" not in caplog.text  # no estimate on the CPU
    saved = load_params(result.model_dir / "params.json")
    assert (saved.mixed_precision, saved.use_8bit_adam, saved.gradient_checkpointing,
            saved.attention, saved.cache_latents, saved.train_batch_size,
            saved.train_text_encoder) == ("no", False, False, "default", True, 1, True)


def test_frozen_text_encoder_stays_bit_identical(tiny_config):
    base = tiny_model_path()
    frozen = train(tiny_config.copy(train_text_encoder=False), progress=False)
    assert same(weights(frozen.model_dir, "text_encoder"), weights(base, "text_encoder"))
    assert not same(weights(frozen.model_dir, "unet"), weights(base, "unet"))
    assert same(weights(frozen.model_dir, "vae"), weights(base, "vae"))

    trained = train(tiny_config.copy(model_name="te", train_text_encoder=True), progress=False)
    assert not same(weights(trained.model_dir, "text_encoder"), weights(base, "text_encoder"))

    stopped_at_zero = train(tiny_config.copy(model_name="te0", train_text_encoder=True,
                                             stop_text_encoder=0.0), progress=False)
    assert same(weights(stopped_at_zero.model_dir, "text_encoder"), weights(base, "text_encoder"))


def test_same_seed_same_weights(tiny_config):
    a = train(tiny_config.copy(model_name="a"), progress=False)
    b = train(tiny_config.copy(model_name="b"), progress=False)
    c = train(tiny_config.copy(model_name="c", seed=99), progress=False)
    assert a.losses == b.losses
    assert same(weights(a.model_dir, "unet"), weights(b.model_dir, "unet"))
    assert not same(weights(a.model_dir, "unet"), weights(c.model_dir, "unet"))


def test_options_act(tiny_config, caplog):
    """Uncached latents, no flip, center crop, grad accumulation, checkpointing, EMA, scale LR,
    unpadded prompts, fp16 on CPU (falls back), a cosine schedule with warmup."""
    lrs = []
    config = tiny_config.copy(
        cache_latents=False, hflip=False, center_crop=True, gradient_accumulation_steps=2,
        gradient_checkpointing=True, use_ema=True, ema_on_cpu=True, scale_lr=True,
        pad_tokens=False, mixed_precision="fp16", lr_scheduler="cosine", lr_warmup_steps=2,
        max_train_steps=4, learning_rate=1e-4)
    with caplog.at_level(logging.WARNING):
        result = train(config, progress=False, on_step=lambda s, loss, lr: lrs.append(lr))
    assert "training on the CPU in fp32" in caplog.text
    assert result.steps == 4
    # scale LR: 1e-4 x batch 2 x accumulation 2; warm-up then cosine decay.
    assert lrs[1] == pytest.approx(4e-4)
    assert lrs[0] < lrs[1] and lrs[3] < lrs[1]
    assert (result.model_dir / "unet_ema").is_dir()
    assert not same(weights(result.model_dir, "unet_ema"), weights(result.model_dir, "unet"))


def test_stop_event_saves_what_was_trained(tiny_config):
    stop = threading.Event()

    def on_step(step, loss, lr):
        if step == 3:
            stop.set()

    result = train(tiny_config.copy(max_train_steps=50), stop=stop, on_step=on_step,
                   progress=False)
    assert result.stopped_early and result.steps == 3
    assert (result.model_dir / "model_index.json").is_file()


def test_preview_and_periodic_saves(tiny_config):
    config = tiny_config.copy(max_train_steps=9, save_every_steps=3, save_preview_every=1)
    result = train(config, progress=False)
    grids = sorted((config.model_dir / "samples").glob("*-grid.png"))
    assert len(grids) == 3  # 3 steps per epoch (6 images, batch 2): one preview per epoch
    assert len(list((config.model_dir / "samples").glob("epoch-0001-0*.png"))) == 2
    assert (result.model_dir / "training_info.json").is_file()


def test_bad_data_stops_before_any_model_loads(tiny_config, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "instance"
    shutil.copytree(tiny_config.concepts_list[0].instance_data_dir, folder)
    (folder / "broken.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    config = tiny_config.copy()
    config.concepts_list[0].instance_data_dir = str(folder)

    def no_models(name, vae=""):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(train_module, "load_components", no_models)
    with pytest.raises(DataError) as err:
        train(config, progress=False)
    text = str(err.value)
    assert "broken.jpg" in text and "notes.png" in text

    config.concepts_list[0].class_prompt = "a photo of zwx toy"
    with pytest.raises(ConfigError, match="instance token"):
        train(config, progress=False)


def test_missing_class_images_are_generated_first(tiny_config):
    concept = tiny_config.concepts_list[0]
    concept.class_data_dir = ""  # -> <model dir>/classifiers/concept_1
    concept.num_class_images = 3
    concept.class_infer_steps = 2
    result = train(tiny_config, progress=False)
    folder = tiny_config.model_dir / "classifiers" / "concept_1"
    assert len(list(folder.glob("*.png"))) == 3
    assert len(list(folder.glob("*.txt"))) == 3
    assert result.steps == tiny_config.max_train_steps


def test_previews_every_n_steps(tiny_config):
    config = tiny_config.copy(max_train_steps=4, save_preview_every_steps=2)
    train(config, progress=False)
    grids = sorted(p.name for p in (config.model_dir / "samples").glob("*-grid.png"))
    assert grids == ["step-000002-grid.png", "step-000004-grid.png"]
