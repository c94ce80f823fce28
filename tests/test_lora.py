"""LoRA training on the real tiny model and the demo's real image files:
colab_dreambooth.models.lora and the Use LORA path of colab_dreambooth.training.train.

One LoRA run is trained per module; the tests then check the file it wrote against the model
as it was at the end of training (captured by a pass-through wrapper around the save).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from colab_dreambooth.config.params import load_params, params_from_dict
from colab_dreambooth.config.presets import apply_preset
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.config.validation import check_lora, lora_problems, validate
from colab_dreambooth.demo import demo_config
from colab_dreambooth.errors import ConfigError
from colab_dreambooth.models import lora_file
from colab_dreambooth.models.loading import load_components
from colab_dreambooth.models.lora import (
    TEXT_ENCODER_TARGET_MODULES,
    UNET_TARGET_MODULES,
    add_lora,
    effective_alpha,
    lora_file_path,
    lora_metadata,
)
from colab_dreambooth.models.lora_file import kohya_state_dict, read_lora, save_lora
from colab_dreambooth.models.pipelines import load_lora_pipeline
from colab_dreambooth.models.tiny import tiny_model_path
from colab_dreambooth.runtime.device import DeviceInfo
from colab_dreambooth.training import saving as saving_module
from colab_dreambooth.training import train as train_module
from colab_dreambooth.training.train import train

PROMPT = "a photo of zwx toy"
FAKE_TOKEN = "hf_" + "lorateSTtokenNEVER" + "toBEwrittenXYZ123"  # built at run time: no token-shaped literal
KEY = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
# The AUTOMATIC1111 WebUI's patterns for SD 1.x LoRA names (extensions-builtin/Lora).
WEBUI_PATTERNS = [re.compile(p) for p in (
    r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)",
    r"lora_unet_mid_block_attentions_(\d+)_(.+)",
    r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)",
    r"lora_te_text_model_encoder_layers_(\d+)_(.+)")]
ATTENTION_SUFFIX = re.compile(
    r"(transformer_blocks_\d+_attn[12]_(to_q|to_k|to_v|to_out_0)|self_attn_(q|k|v|out)_proj)$")


# ----------------------------------------------------------------------------- helpers
def files_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def base_weights(model) -> dict[str, torch.Tensor]:
    """The frozen base weights of a peft-wrapped model, under the base model's own names."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()
            if "lora_" not in k}


def file_weights(part: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((tiny_model_path() / part).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def bit_identical(model, part: str) -> bool:
    ours, saved = base_weights(model), file_weights(part)
    return set(saved) <= set(ours) and all(torch.equal(ours[k], saved[k]) for k in saved)


def outputs(unet, text_encoder, vae, tokenizer, scheduler) -> dict[str, torch.Tensor]:
    """Text-encoder states, one UNet prediction and a 2-step 64x64 image, all seeded."""
    from diffusers import StableDiffusionPipeline

    ids = tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = text_encoder(ids)[0]
        noise = unet(latents, 500, states).sample
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=type(scheduler).from_config(scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    return {"states": states, "noise": noise, "image": torch.from_numpy(image)}


def pipe_outputs(pipe) -> dict[str, torch.Tensor]:
    return outputs(pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer, pipe.scheduler)


def base_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path(), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_parts():
    """The tiny model's components, loaded once (tests that change them take a copy)."""
    return load_components("tiny")


@pytest.fixture
def parts(tiny_parts):
    return copy.deepcopy(tiny_parts)


@pytest.fixture(scope="module")
def base_outputs():
    return pipe_outputs(base_pipeline())


# ----------------------------------------------------------------------------- one LoRA run
@pytest.fixture(scope="module")
def run(demo_root, tmp_path_factory):
    """A 3-step LoRA run (UNet rank 4, text encoder rank 2, alpha 2, gradient checkpointing,
    a save at step 2 and a preview), with the model's outputs captured at the final save."""
    out = tmp_path_factory.mktemp("lora-run")
    config = demo_config(demo_root, steps=3)
    concept = config.concepts_list[0]
    concept.n_save_sample, concept.save_infer_steps = 1, 2  # a cheap preview
    config = config.copy(
        models_root=str(out), model_name="zwx-lora", use_lora=True, lora_unet_rank=4,
        lora_txt_rank=2, lora_alpha=2.0, lora_learning_rate=1e-2,
        lora_txt_learning_rate=1e-2, gradient_checkpointing=True, save_every_steps=2,
        save_preview_every=1, train_batch_size=1, cache_latents=False)
    base_before = files_digest(tiny_model_path())
    captured: dict = {}
    saves: list[int] = []
    original = saving_module.save_lora_model

    def spy(config, parts, unet, text_encoder, step, *rest):
        saves.append(step)
        if step < config.max_train_steps:
            return original(config, parts, unet, text_encoder, step, *rest)
        modes = unet.training, text_encoder.training
        unet.eval()
        text_encoder.eval()
        captured.update(outputs(unet, text_encoder, parts.vae, parts.tokenizer,
                                parts.inference_scheduler))
        captured["unet_identical"] = bit_identical(unet, "unet")
        captured["text_encoder_identical"] = bit_identical(text_encoder, "text_encoder")
        unet.train(modes[0])
        text_encoder.train(modes[1])
        return original(config, parts, unet, text_encoder, step, *rest)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(saving_module, "save_lora_model", spy)
        mp.setenv("HF_TOKEN", FAKE_TOKEN)  # must never reach a file
        result = train(config, progress=False)
    state, meta = read_lora(result.lora_file)
    return SimpleNamespace(config=config, result=result, captured=captured, saves=saves,
                           base_before=base_before, state=state, meta=meta)


def test_run_writes_the_lora_file_and_no_full_model(run):
    config, result = run.config, run.result
    assert result.steps == 3 and len(result.losses) == 3
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert run.saves == [3]  # step 2 wrote a checkpoint (adapters + state), not the file
    assert result.checkpoint.name == "checkpoint-00000003"
    assert result.lora_file == lora_file_path(config) == (
        config.model_dir / "lora" / "zwx-lora.safetensors")
    assert result.model_dir == result.lora_file.parent
    assert not (config.model_dir / "model").exists()  # no full weights written
    names = {p.name for p in result.model_dir.iterdir()}
    assert names == {"zwx-lora.safetensors", "params.json", "training_info.json"}  # no temps
    # The saved parameters are what trained: blank (auto) fields as the preset filled them.
    assert load_params(result.model_dir / "params.json") == apply_preset(
        config, DeviceInfo.cpu())[0]
    info = json.loads((result.model_dir / "training_info.json").read_text())
    assert info["lora"] is True and info["lora_file"] == "zwx-lora.safetensors"
    assert info["steps"] == 3
    assert list((config.model_dir / "samples").glob("*-grid.png"))  # previews with the adapters


def test_base_weights_stay_bit_identical(run):
    assert run.captured["unet_identical"]
    assert run.captured["text_encoder_identical"]
    assert files_digest(tiny_model_path()) == run.base_before  # the base files untouched


def test_keys_follow_kohya_layout(run, tiny_parts):
    state = run.state
    assert all(KEY.match(k) for k in state), [k for k in state if not KEY.match(k)]
    parts = tiny_parts
    unet_layers = {n for n, _ in parts.unet.named_modules()
                   if n.endswith(tuple("." + t for t in UNET_TARGET_MODULES))}
    text_layers = {n for n, _ in parts.text_encoder.named_modules()
                   if n.endswith(tuple("." + t for t in TEXT_ENCODER_TARGET_MODULES))}
    expected = ({"lora_unet_" + n.replace(".", "_") for n in unet_layers}
                | {"lora_te_text_model_" + n.replace(".", "_") for n in text_layers})
    assert len(unet_layers) == 16 * 2 * 4  # 16 transformer blocks x attn1/attn2 x q/k/v/out
    assert len(text_layers) == 2 * 4
    assert {k.split(".")[0] for k in state} == expected
    assert len(state) == 3 * len(expected)  # down, up, alpha each
    for key in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0",
                "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k",
                "lora_te_text_model_encoder_layers_1_self_attn_out_proj"):
        assert f"{key}.lora_down.weight" in state and f"{key}.alpha" in state
    # every name is one the WebUI maps to the original (LDM) model, and an attention projection
    for name in expected:
        assert any(p.fullmatch(name) for p in WEBUI_PATTERNS), name
        assert ATTENTION_SUFFIX.search(name), name
    # the WebUI's arithmetic lands on SD 1.x's attention blocks: input_blocks 1,2,4,5,7,8,
    # middle_block 1, output_blocks 3-11
    down, mid, up = (WEBUI_PATTERNS[0], WEBUI_PATTERNS[1], WEBUI_PATTERNS[2])
    inputs = {1 + 3 * int(m[1]) + int(m[2]) for m in map(down.fullmatch, expected) if m}
    outputs_ = {3 * int(m[1]) + int(m[2]) for m in map(up.fullmatch, expected) if m}
    assert inputs == {1, 2, 4, 5, 7, 8} and outputs_ == set(range(3, 12))
    assert any(mid.fullmatch(n) for n in expected)
    # shapes: down (rank x in), up (out x rank); alpha a scalar
    q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    layer = parts.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")
    assert state[f"{q}.lora_down.weight"].shape == (4, layer.in_features)  # 32: text width
    assert state[f"{q}.lora_up.weight"].shape == (layer.out_features, 4)
    te = "lora_te_text_model_encoder_layers_0_self_attn_v_proj"
    assert state[f"{te}.lora_down.weight"].shape == (2, 32)
    assert state[f"{te}.lora_up.weight"].shape == (32, 2)
    alphas = {state[k].item() for k in state if k.endswith(".alpha")}
    assert alphas == {2.0}
    assert all(state[k].ndim == 0 and state[k].dtype == torch.float32
               for k in state if k.endswith(".alpha"))


def test_adapters_trained_in_both_parts(run):
    lr = run.config.lora_learning_rate  # the text encoder's is the same here
    moved = {k.split(".")[0]: v.abs().max().item() for k, v in run.state.items()
             if k.endswith("lora_up.weight")}
    # lora_up starts at zero: every up weight moved, in the UNet and the text encoder, except
    # the mid block's self-attention q/k: at 64 px its map is 1x1, and a softmax over one
    # token has no gradient in exact arithmetic. Kernels that compute the softmax's backward
    # another way leave a rounding residue, which Adam (dividing by its root mean square)
    # turns into steps of about lr * |g| / eps: 2e-6 to 3.6e-6 seen (on an AVX-512 CPU and an
    # AMD EPYC), 0 on others. The trained adapters moved by 0.55 lr and more (Adam's steps are
    # about lr each), so lr / 100 tells them apart with a wide margin either side.
    still = {name for name, size in moved.items() if size < lr / 100}
    assert still == {"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q",
                     "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k"}, moved
    assert any(name.startswith("lora_te_") for name in moved if name not in still)


def test_diffusers_load_reproduces_the_trained_model(run, base_outputs):
    before = base_outputs
    base = base_pipeline()
    # The file as diffusers reads it (0.39 + transformers 5, Colab's, needs its text-encoder
    # names without "text_model_"; newer diffusers read the file unchanged).
    state = lora_file.state_for_diffusers(read_lora(run.result.lora_file)[0], base.text_encoder)
    base.load_lora_weights(state)
    loaded = pipe_outputs(base)
    trained = run.captured
    for name in ("states", "noise"):
        torch.testing.assert_close(loaded[name], trained[name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded["image"], trained["image"], rtol=0, atol=1e-4)
    # and training changed what the model does
    assert (trained["states"] - before["states"]).abs().max() > 1e-2
    assert (trained["noise"] - before["noise"]).abs().max() > 1e-3
    assert (trained["image"] - before["image"]).abs().max() > 1e-3


def test_load_lora_pipeline_scale(run, base_outputs):
    """``scale`` is the WebUI's multiplier: 0 gives the base model, 1 the trained one."""
    pipe = load_lora_pipeline("tiny", run.result.lora_file, device="cpu", scale=0.0)
    torch.testing.assert_close(pipe_outputs(pipe)["noise"], base_outputs["noise"],
                               rtol=1e-5, atol=1e-6)
    pipe.set_adapters(["lora"], adapter_weights=[1.0])
    torch.testing.assert_close(pipe_outputs(pipe)["noise"], run.captured["noise"],
                               rtol=1e-5, atol=1e-5)


def test_metadata(run):
    meta, config = run.meta, run.config
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["colab_dreambooth.text_encoder_dim"] == "2"
    assert meta["colab_dreambooth.text_encoder_alpha"] == "2"
    assert meta["colab_dreambooth.unet_target_modules"] == "to_q,to_k,to_v,to_out.0"
    assert meta["ss_network_train_unet_only"] == "False"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_sd_model_name"] == "tiny"
    assert meta["ss_steps"] == "3" and meta["ss_seed"] == str(config.seed)
    assert meta["ss_unet_lr"] == "0.01" and meta["ss_text_encoder_lr"] == "0.01"
    assert meta["ss_num_train_images"] == "6" and meta["ss_num_reg_images"] == "12"
    assert meta["ss_resolution"] == "(64, 64)"
    prompts = json.loads(meta["ss_instance_prompts"])
    assert prompts and all("zwx toy" in p for p in prompts)
    tags = json.loads(meta["ss_tag_frequency"])
    assert sum(next(iter(tags.values())).values()) == 6
    assert "[filewords]" in meta["ss_training_comment"]
    assert all(isinstance(v, str) for v in meta.values())


@pytest.mark.parametrize("base, name", [
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ("/home/alice/models/my-sd15/", "my-sd15"),
    ("E:\\dev\\models\\dreambooth\\x\\working", "working"),
    ("/content/drive/MyDrive/ckpt/deliberate_v2.safetensors", "deliberate_v2.safetensors")])
def test_metadata_names_the_base_model_without_its_folders(base, name):
    config = DreamBoothConfig(use_lora=True, pretrained_model_name_or_path=base)
    unet = SimpleNamespace(config=SimpleNamespace(cross_attention_dim=768))
    meta = lora_metadata(config, unet, steps=1, epochs=1, seed=0, instance_prompts=["sks dog"])
    assert meta["ss_sd_model_name"] == name


def test_metadata_tells_sd2_from_sd1():
    sd2 = SimpleNamespace(config=SimpleNamespace(cross_attention_dim=1024))
    meta = lora_metadata(DreamBoothConfig(use_lora=True, resolution=768), sd2, steps=1, epochs=1,
                         seed=0, instance_prompts=["sks dog"], prediction_type="v_prediction")
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["ss_network_alpha"] == "4"  # blank alpha = the rank
    assert meta["ss_network_train_unet_only"] == "False"


def test_no_token_and_no_local_paths_in_outputs(run):
    for path in run.config.model_dir.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path
    header = json.dumps(run.meta)
    assert FAKE_TOKEN not in header
    assert str(Path(run.config.models_root)) not in header  # no folders of this machine


def test_file_is_small(run):
    size = run.result.lora_file.stat().st_size
    model = sum(p.stat().st_size for p in tiny_model_path().rglob("*.safetensors"))
    assert size < model / 50, (size, model)  # ~0.24 MB against ~22 MB for the tiny model


# ----------------------------------------------------------------------------- adapters
def test_add_lora_freezes_base_and_scales_by_alpha_over_rank(parts):
    from peft.tuners.lora import LoraLayer

    config = DreamBoothConfig(use_lora=True, lora_unet_rank=8, lora_txt_rank=2, lora_alpha=4.0)
    params = add_lora(parts.unet, parts.text_encoder, config)
    trainable = [p for m in (parts.unet, parts.text_encoder) for p in m.parameters()
                 if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in trainable}
    names = [n for m in (parts.unet, parts.text_encoder) for n, p in m.named_parameters()
             if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    scales = {m.scaling["default"] for m in parts.unet.modules() if isinstance(m, LoraLayer)}
    assert scales == {4.0 / 8}
    scales = {m.scaling["default"] for m in parts.text_encoder.modules()
              if isinstance(m, LoraLayer)}
    assert scales == {4.0 / 2}
    # a fresh adapter changes nothing (up starts at zero)
    state = kohya_state_dict(parts.unet, parts.text_encoder)
    assert all(not v.any() for k, v in state.items() if k.endswith("lora_up.weight"))


def test_blank_alpha_is_the_rank(parts):
    assert effective_alpha(None, 16) == 16.0 and effective_alpha(0.0, 4) == 4.0
    assert effective_alpha(1.0, 16) == 1.0
    add_lora(parts.unet, parts.text_encoder,
             DreamBoothConfig(use_lora=True, lora_unet_rank=8, train_text_encoder=False))
    state = kohya_state_dict(parts.unet)
    assert {state[k].item() for k in state if k.endswith(".alpha")} == {8.0}  # scale 1.0


def test_no_text_encoder_adapters_without_train_text_encoder(parts):
    from peft.tuners.lora import LoraLayer

    add_lora(parts.unet, parts.text_encoder,
             DreamBoothConfig(use_lora=True, train_text_encoder=False))
    assert not any(isinstance(m, LoraLayer) for m in parts.text_encoder.modules())
    assert not any(p.requires_grad for p in parts.text_encoder.parameters())
    assert all(k.startswith("lora_unet_") for k in kohya_state_dict(parts.unet,
                                                                     parts.text_encoder))


def test_adapters_stay_fp32_on_a_half_precision_base(parts):
    parts.unet.to(dtype=torch.bfloat16)
    parts.text_encoder.to(dtype=torch.bfloat16)
    params = add_lora(parts.unet, parts.text_encoder, DreamBoothConfig(use_lora=True))
    assert params and all(p.dtype == torch.float32 for p in params)
    frozen = [p for p in parts.unet.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen)


def test_save_is_atomic(tmp_path):
    path = tmp_path / "lora" / "x.safetensors"
    good = {"lora_unet_a.alpha": torch.tensor(1.0)}
    save_lora(path, good, {"ss_network_dim": "4"})
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_lora(path, {"lora_unet_a.alpha": torch.tensor(2.0)}, {"bad": 1})  # not a str
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"ss_network_dim": "4"}


# ----------------------------------------------------------------------------- settings
def test_defaults():
    config = DreamBoothConfig()
    assert config.use_lora is False
    assert (config.lora_unet_rank, config.lora_txt_rank) == (4, 4)
    assert (config.lora_learning_rate, config.lora_txt_learning_rate) == (1e-4, 5e-5)
    assert config.lora_alpha is None


def test_extension_lora_keys_load():
    loaded = params_from_dict({"use_lora": True, "lora_unet_rank": 32, "lora_txt_rank": 8,
                               "lora_learning_rate": 2e-4, "lora_txt_learning_rate": 1e-4,
                               "lora_weight": 0.8, "lora_alpha": 16})
    config = loaded.config
    assert config.use_lora is True and config.lora_unet_rank == 32 and config.lora_txt_rank == 8
    assert config.lora_learning_rate == 2e-4 and config.lora_txt_learning_rate == 1e-4
    assert config.lora_alpha == 16.0
    assert loaded.ignored_keys == ["lora_weight"]  # the WebUI-side multiplier: not ours


@pytest.mark.parametrize("field, value", [("lora_unet_rank", 0), ("lora_txt_rank", 0),
                                          ("lora_unet_rank", -4), ("lora_alpha", -1.0)])
def test_rank_and_alpha_limits(tiny_config, field, value):
    config = tiny_config.copy(use_lora=True, **{field: value})
    problems = [p for p in validate(config, DeviceInfo.cpu()) if p.where == field]
    assert len(problems) == 1 and "below the minimum" in problems[0].message


def test_lora_with_ema_is_refused_before_any_model_loads(tiny_config, monkeypatch):
    config = tiny_config.copy(use_lora=True, use_ema=True)
    (problem,) = lora_problems(config)
    assert problem.where == "use_ema" and "Train EMA" in problem.message
    assert not lora_problems(tiny_config.copy(use_ema=True))  # EMA alone is fine
    assert not lora_problems(tiny_config.copy(use_lora=True))

    def no_loading(name, vae=""):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(train_module, "load_components", no_loading)
    with pytest.raises(ConfigError, match="use_ema"):
        train(config, progress=False)
    with pytest.raises(ConfigError):
        check_lora(config)


# ----------------------------------------------------------------------------- after training
def test_model_card_of_a_lora_run(run):
    from diffusers import StableDiffusionPipeline

    from colab_dreambooth.publish.model_card import write_model_card

    working_folder = run.config.model_dir  # <models root>/dreambooth/<name>: finds lora/
    card_path = write_model_card(working_folder)
    assert card_path == run.result.lora_file.parent / "README.md"
    card = card_path.read_text(encoding="utf-8")
    assert "LoRA adapters (DreamBooth-LoRA) for" in card and "DreamBooth fine-tune" not in card
    assert "- lora" in card
    assert "| LoRA rank / alpha (UNet) | 4 / 2 |" in card
    assert "| LoRA rank / alpha (text encoder) | 2 / 2 |" in card
    assert "| Learning rate (UNet) | 0.01 |" in card
    assert "| Learning rate (text encoder) | 0.01 |" in card
    assert "2e-06" not in card and "1e-06" not in card  # the full fine-tune's rates
    file = run.result.lora_file.name
    assert f'pipe.load_lora_weights(".", weight_name="{file}")' in card
    assert f"<lora:{run.result.lora_file.stem}:1>" in card
    assert "from_pretrained(\".\"" not in card  # the folder holds no diffusers model
    compile(card.split("```python\n")[1].split("```")[0], "the card's snippet", "exec")
    # what the snippet does, on the real files: the base model plus the folder and file name
    # (on diffusers 0.40 and newer; older ones with transformers 5, as Colab has, cannot
    # place the text-encoder part: the card says so, and load_lora_pipeline works there)
    from importlib.metadata import version

    from packaging.version import Version

    assert "diffusers 0.40 or newer" in card
    if Version(version("diffusers")) >= Version("0.40"):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path(), safety_checker=None)
        pipe.load_lora_weights(str(card_path.parent), weight_name=file)
    else:
        pipe = load_lora_pipeline("tiny", card_path.parent / file)
    torch.testing.assert_close(pipe_outputs(pipe)["noise"], run.captured["noise"],
                               rtol=1e-5, atol=1e-5)


def test_sample_command_takes_a_lora_on_a_base_model(run, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from colab_dreambooth import cli
    from colab_dreambooth.generation.sample import generate_samples

    common = ["--prompt", PROMPT, "--seed", "3", "--steps", "2", "--height", "64", "--width",
              "64", "--no-progress"]
    assert cli.main(["sample", "tiny", "--lora", str(run.result.lora_file), "--out",
                     str(tmp_path / "a"), *common]) == 0
    # the run's own folder is enough: base model and LoRA file are read from it
    assert cli.main(["sample", str(run.config.model_dir), "--out", str(tmp_path / "b"),
                     *common]) == 0
    assert "A LoRA run" in capsys.readouterr().out
    expected = generate_samples(load_lora_pipeline("tiny", run.result.lora_file), PROMPT, n=1,
                                seed=3, steps=2, height=64, width=64, progress=False)[0]
    plain = generate_samples(base_pipeline(), PROMPT, n=1, seed=3, steps=2, height=64,
                             width=64, progress=False)[0]
    for folder in ("a", "b"):
        with Image.open(tmp_path / folder / "sample-001-000.png") as image:
            assert np.array_equal(np.asarray(image), np.asarray(expected)), folder
    assert not np.array_equal(np.asarray(expected), np.asarray(plain))  # the LoRA counts


def test_sample_errors_of_a_lora_run_name_the_lora(run, tmp_path, capsys):
    from colab_dreambooth import cli

    code = cli.main(["sample", "tiny", "--lora", str(tmp_path / "missing.safetensors"),
                     "--prompt", "x", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "LoRA file" in err and "missing.safetensors" in err
    assert "Traceback" not in err
    code = cli.main(["sample", str(run.result.lora_file.parent.parent / "model"), "--prompt",
                     "x", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "not found" in err


def test_release_of_a_lora_run(run):
    from colab_dreambooth.publish.release import ReleaseSettings, make_release, sample_model

    samples = sample_model(run.config, PROMPT, progress=False)  # base + LoRA, no model/ needed
    result = make_release(run.config, ReleaseSettings(export_name="zwx toy lora",
                                                      dehydrate=True), grid=samples.grid,
                          progress=False)
    assert result.export.name == "zwx toy lora.safetensors"
    assert result.export.read_bytes() == run.result.lora_file.read_bytes()
    card = result.card.read_text(encoding="utf-8")
    assert 'weight_name="zwx toy lora.safetensors"' in card and "![Samples]" in card
    assert result.dehydrated is None and "Dehydrate skipped" in str(result)
