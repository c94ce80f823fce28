"""The Optimizer choices (AdamW, Lion, Prodigy, Adafactor), weight decay and betas."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
from safetensors.torch import load_file

from colab_dreambooth.config.params import load_params
from colab_dreambooth.config.settings import OPTIMIZERS
from colab_dreambooth.config.validation import validate
from colab_dreambooth.errors import ConfigError
from colab_dreambooth.runtime.device import DeviceInfo
from colab_dreambooth.runtime.packages import OPTIMIZER_PACKAGES
from colab_dreambooth.training.optim import OptimizerUnavailable, make_optimizer, optimizer_class
from colab_dreambooth.training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

EXPECTED_CLASSES = {"AdamW": "torch.optim.adamw.AdamW", "Lion": "lion_pytorch.lion_pytorch.Lion",
                    "Prodigy": "prodigyopt.prodigy.Prodigy",
                    "Adafactor": "transformers.optimization.Adafactor"}


def _make(name, params, **kw):
    args = dict(use_8bit=False, on_cuda=False, betas=(0.9, 0.99), weight_decay=0.0, eps=1e-8)
    args.update(kw)
    return make_optimizer(params, name, **args)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_is_built_and_steps(name):
    assert set(OPTIMIZERS) == set(EXPECTED_CLASSES)
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8))
    lr = 1.0 if name == "Prodigy" else 1e-2
    opt = _make(name, [{"params": [w], "lr": lr}])
    cls = type(opt)
    assert f"{cls.__module__}.{cls.__qualname__}" == EXPECTED_CLASSES[name]
    before = w.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        (w ** 2).sum().backward()
        opt.step()
    assert (w.detach() ** 2).sum() < (before ** 2).sum()  # it descends


def test_weight_decay_and_betas_reach_the_optimizer():
    w, t = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = _make("Lion", [{"params": [w], "lr": 1e-4}, {"params": [t], "lr": 1e-4,
                                                       "weight_decay": 0.5}],
                betas=(0.8, 0.95), weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.5]
    assert opt.param_groups[0]["betas"] == (0.8, 0.95)
    prodigy = _make("Prodigy", [{"params": [w], "lr": 1.0}], warmup_steps=10)
    assert prodigy.param_groups[0]["safeguard_warmup"] is True
    assert prodigy.param_groups[0]["d"] == pytest.approx(1e-6)


@pytest.mark.parametrize("name", sorted(set(OPTIMIZER_PACKAGES) - {"Adafactor"}))
def test_missing_package_gives_a_clear_message(name, monkeypatch, demo_root):
    module, _, package = OPTIMIZER_PACKAGES[name]
    monkeypatch.setitem(sys.modules, module, None)  # "import module" now raises ImportError
    with pytest.raises(OptimizerUnavailable) as err:
        optimizer_class(name)
    message = str(err.value)
    assert package in message and "colab-dreambooth[optimizers]" in message and "AdamW" in message
    # validation says so before any model loads
    from colab_dreambooth.demo import demo_config

    config = demo_config(demo_root).copy(optimizer=name, learning_rate=1.0,
                                         text_encoder_learning_rate=1.0)
    problems = [p for p in validate(config, DeviceInfo.cpu()) if p.where == "optimizer"]
    assert len(problems) == 1 and package in problems[0].message


def test_prodigy_needs_learning_rates_near_one(demo_root):
    from colab_dreambooth.demo import demo_config

    config = demo_config(demo_root).copy(optimizer="Prodigy")
    wheres = {p.where for p in validate(config, DeviceInfo.cpu())}
    assert wheres == {"learning_rate", "text_encoder_learning_rate"}
    ok = config.copy(learning_rate=1.0, text_encoder_learning_rate=0.5)
    assert validate(ok, DeviceInfo.cpu()) == []
    lora = config.copy(use_lora=True, lora_learning_rate=1.0, lora_txt_learning_rate=1e-4)
    assert {p.where for p in validate(lora, DeviceInfo.cpu())} == {"lora_txt_learning_rate"}


def test_8bit_lion_falls_back_off_cuda(caplog):
    w = torch.nn.Parameter(torch.zeros(2))
    with caplog.at_level(logging.WARNING):
        opt = _make("Lion", [{"params": [w], "lr": 1e-4}], use_8bit=True)
    assert type(opt).__name__ == "Lion" and "8-bit Lion needs a CUDA GPU" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _make("Adafactor", [{"params": [w], "lr": 1e-4}], use_8bit=True)
    assert "no effect on Adafactor" in caplog.text


@pytest.mark.parametrize("name,eight_bit", [("Lion", False), ("8bit Lion", True),
                                            ("Prodigy", None), ("Adafactor", None)])
def test_extension_optimizer_names_import(tmp_path, name, eight_bit):
    path = tmp_path / "db_config.json"
    path.write_text(json.dumps({"optimizer": name, "tenc_weight_decay": 0.05}))
    config = load_params(path)
    assert config.optimizer == name.replace("8bit ", "")
    assert config.use_8bit_adam is eight_bit
    assert config.tenc_weight_decay == 0.05


def _unet(folder):
    return load_file(next((folder / "unet").glob("*.safetensors")))


def test_optimizers_train_the_tiny_model_differently(tiny_config):
    """Each optimizer trains (loss is finite, weights move) and moves them its own way."""
    base = tiny_config.copy(max_train_steps=2, train_text_encoder=False, lr_warmup_steps=0)
    runs = {}
    for name in OPTIMIZERS:
        lr = 1.0 if name == "Prodigy" else 1e-3
        result = train(base.copy(model_name=name, optimizer=name, learning_rate=lr),
                       progress=False)
        assert all(torch.isfinite(torch.tensor(result.losses)))
        runs[name] = _unet(result.model_dir)
    names = list(runs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert any(not torch.equal(runs[a][k], runs[b][k]) for k in runs[a]), (a, b)


def test_text_encoder_weight_decay_reaches_the_loop(tiny_config, monkeypatch):
    from colab_dreambooth.training import optim as optim_module

    made = []

    def spy(groups, name, **kw):
        made.append((groups, kw))
        return make_optimizer(groups, name, **kw)

    monkeypatch.setattr(optim_module, "make_optimizer", spy)
    train(tiny_config.copy(max_train_steps=1, weight_decay=0.02, tenc_weight_decay=0.3),
          progress=False)
    (groups, kw), = made
    assert kw["weight_decay"] == 0.02 and groups[0]["weight_decay"] == 0.02
    assert groups[1]["weight_decay"] == 0.3  # the text encoder's group


def test_missing_optimizer_stops_before_training(tiny_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)
    with pytest.raises(ConfigError, match="lion-pytorch"):
        train(tiny_config.copy(optimizer="Lion"), progress=False)


def test_the_extensions_training_option_keys_import(tmp_path):
    """Its saved db_config.json keys for these options load as our fields (none ignored)."""
    from colab_dreambooth.config.extension_import import EXTENSION_ONLY_KEYS
    from colab_dreambooth.config.params import read_params

    values = {"optimizer": "Prodigy", "tenc_weight_decay": 0.02, "offset_noise": 0.1,
              "min_snr_gamma": 5, "noise_scheduler": "UniPC", "clip_skip": 2,
              "max_token_length": 150, "shuffle_tags": True, "freeze_clip_normalization": True,
              "deterministic": True, "tf32_enable": True, "stop_text_encoder": 0.5,
              "enable_bucket": True, "keep_tokens": 2, "full_fp16": True}
    path = tmp_path / "db_config.json"
    path.write_text(json.dumps(values))
    loaded = read_params(path)
    config = loaded.config
    assert loaded.ignored_keys == []
    assert (config.optimizer, config.tenc_weight_decay, config.offset_noise,
            config.min_snr_gamma, config.noise_scheduler, config.clip_skip,
            config.max_token_length) == ("Prodigy", 0.02, 0.1, 5.0, "UniPC", 2, 150)
    assert config.shuffle_tags and config.freeze_clip_normalization and config.deterministic
    assert config.allow_tf32 and config.enable_bucket and config.full_fp16
    assert config.keep_tokens == 2 and config.stop_text_encoder == 0.5
    assert not set(values) & EXTENSION_ONLY_KEYS
    assert "half_model" in EXTENSION_ONLY_KEYS  # the extension's means "export in fp16"


def test_memory_estimate_counts_the_optimizers_state_and_the_half_model():
    from colab_dreambooth.config.concept import Concept
    from colab_dreambooth.config.settings import DreamBoothConfig
    from colab_dreambooth.training.memory import SD15, estimate_peak_memory

    t4 = DeviceInfo("cuda", "Tesla T4", 14.7, False, 1, (7, 5))
    base = DreamBoothConfig(concepts_list=[Concept(instance_prompt="sks dog",
                                                   instance_data_dir="/d")],
                            use_8bit_adam=False, mixed_precision="fp16",
                            train_text_encoder=False)

    def states(**changes):
        estimate = estimate_peak_memory(base.copy(**changes), t4, sizes=SD15,
                                        bitsandbytes=True)
        (label, gb), = [(k, v) for k, v in estimate.items if k.startswith("optimizer states")]
        return label, gb, estimate.total_gb

    adamw, lion, prodigy, adafactor = (states(optimizer=n) for n in OPTIMIZERS)
    assert lion[1] == pytest.approx(adamw[1] / 2) and prodigy[1] == pytest.approx(adamw[1] * 2)
    assert adafactor[1] == 0 and "Adafactor" in adafactor[0]
    assert states(optimizer="Lion", use_8bit_adam=True)[0] == "optimizer states (8-bit Lion)"
    assert states(optimizer="Prodigy", use_8bit_adam=True)[1] == prodigy[1]  # no 8-bit form
    half = states(full_fp16=True)
    assert half[1] == pytest.approx(adamw[1] / 2) and half[2] < adamw[2] - 3
