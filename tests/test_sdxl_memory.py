"""The memory estimate, presets and environment report for SDXL (issue 15): SDXL base's exact
sizes, its calibrated activations, the family-aware presets and fixes, and the targets (LoRA
rank 32 with prior preservation at 1024 px on a T4 under 14 GB; full fine-tuning refused on
16 GB GPUs with Use LORA, fitting the 80 GB presets)."""

from __future__ import annotations

import pytest
import torch

from colab_dreambooth.config.concept import Concept
from colab_dreambooth.config.presets import PRESETS, apply_preset, choose_preset
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.models.lora import adapter_plan
from colab_dreambooth.runtime.device import DeviceInfo
from colab_dreambooth.training import memory
from colab_dreambooth.training.fit import (
    AUTO_MARGIN,
    GpuMemoryError,
    enforce,
    plan_memory,
    preset_device,
)
from colab_dreambooth.training.memory import (
    SD15,
    SDXL_BASE,
    estimate_peak_memory,
    memory_fixes,
    model_sizes,
    smaller_resolution,
)

SDXL_ID = "stabilityai/stable-diffusion-xl-base-1.0"
T4 = DeviceInfo("cuda", "Tesla T4", 14.7, False, 1, (7, 5), free_memory_gb=14.6)
COLAB = {"bitsandbytes": False, "xformers": False}
WITH_BNB = {"bitsandbytes": True, "xformers": False}
PRIOR = [Concept(instance_prompt="photo of sks dog", class_prompt="photo of a dog",
                 instance_data_dir="/data/dog", num_class_images=100)]

# SDXL base 1.0's published configs (stabilityai/stable-diffusion-xl-base-1.0: unet/,
# text_encoder/, text_encoder_2/, vae/config.json), the fields that shape the models.
SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True}
SDXL_TEXT_ENCODER = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "vocab_size": 49408, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "projection_dim": 768}
SDXL_TEXT_ENCODER_2 = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "vocab_size": 49408, "max_position_embeddings": 77,
    "hidden_act": "gelu", "projection_dim": 1280}
SDXL_VAE = {
    "block_out_channels": [128, 256, 512, 512], "latent_channels": 4, "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}


def sdxl(**changes) -> DreamBoothConfig:
    """SDXL base at 1024 px with prior preservation, LoRA rank 32 when Use LORA is on."""
    values = dict(pretrained_model_name_or_path=SDXL_ID, concepts_list=PRIOR, resolution=1024,
                  lora_unet_rank=32, lora_txt_rank=32)
    return DreamBoothConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def sdxl_parts():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        return (UNet2DConditionModel.from_config(SDXL_UNET),
                CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER)),
                CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2)),
                AutoencoderKL.from_config(SDXL_VAE))


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sdxl_base_sizes_are_the_published_models(sdxl_parts):
    unet, text_encoder, text_encoder_2, vae = sdxl_parts
    assert (_numel(unet), _numel(text_encoder), _numel(text_encoder_2), _numel(vae)) == (
        SDXL_BASE.unet, SDXL_BASE.text_encoder, SDXL_BASE.text_encoder_2, SDXL_BASE.vae)
    assert SDXL_BASE.unet == 2_567_463_684 and SDXL_BASE.text_encoder_2 == 694_659_840
    assert SDXL_BASE.family == "SDXL" and SDXL_BASE.vae_fp32
    assert SD15.text_encoder_2 == 0 and SD15.family == "SD" and not SD15.vae_fp32


def test_sdxl_adapter_figures_are_its_adapted_layers(sdxl_parts):
    """As for SD 1.5 (test_lora_types): in + out features of what adapter_plan adapts."""
    unet, text_encoder, text_encoder_2, _ = sdxl_parts

    def in_out(model, names):
        return sum(model.get_submodule(n).weight.shape[0]
                   + model.get_submodule(n).weight[0].numel() for n in names)

    def outs(model, names):
        return sum(model.get_submodule(n).weight.shape[0] for n in names)

    lora = adapter_plan(unet, "LoRA", text_encoder=False)
    locon = adapter_plan(unet, "LoCon", text_encoder=False, conv=True)
    assert len(lora.linear) == 70 * 2 * 4  # q/k/v/out of both attentions of 70 blocks
    assert in_out(unet, lora.linear) == memory.SDXL_LORA_UNET_PER_RANK
    assert in_out(unet, locon.linear) == memory.SDXL_LOCON_UNET_PER_RANK
    assert in_out(unet, locon.conv) == memory.SDXL_LOCON_CONV_PER_RANK
    texts = (text_encoder, text_encoder_2)
    plans = {kind: [adapter_plan(t, kind, text_encoder=True) for t in texts]
             for kind in ("LoRA", "LoCon")}
    assert sum(in_out(t, p.linear) for t, p in zip(texts, plans["LoRA"])) == \
        memory.SDXL_LORA_TEXT_PER_RANK
    assert sum(in_out(t, p.linear) for t, p in zip(texts, plans["LoCon"])) == \
        memory.SDXL_LOCON_TEXT_PER_RANK
    assert memory.SDXL_DORA_MAGNITUDES == {
        "LoRA": (outs(unet, lora.modules),
                 sum(outs(t, p.modules) for t, p in zip(texts, plans["LoRA"]))),
        "LoCon": (outs(unet, locon.modules),
                  sum(outs(t, p.modules) for t, p in zip(texts, plans["LoCon"])))}


def test_sdxl_models_get_sdxl_sizes():
    assert model_sizes(SDXL_ID) == SDXL_BASE
    assert model_sizes("someone/RealVisXL_V4.0") == SDXL_BASE  # by name, offline
    assert model_sizes("runwayml/stable-diffusion-v1-5") == SD15
    tiny = model_sizes("tiny-sdxl")  # counted from its folder, both text encoders
    assert tiny.family == "SDXL" and tiny.label == "the tiny SDXL model"
    assert 0 < tiny.unet < 10_000_000 and tiny.text_encoder_2 > 0 and tiny.vae_fp32
    config = DreamBoothConfig(pretrained_model_name_or_path="tiny-sdxl", concepts_list=PRIOR)
    estimate = estimate_peak_memory(config, T4, bitsandbytes=True)
    assert estimate.total_gb < 1.0 and any("tiny SDXL" in n for n in estimate.notes)
    assert memory.adapter_parameters(config.copy(use_lora=True), tiny) > 0


def test_t4_trains_sdxl_lora_rank_32_with_prior_preservation_at_1024_under_14_gb():
    for packages in (COLAB, WITH_BNB):
        plan = plan_memory(sdxl(use_lora=True), T4, packages=packages)
        assert plan.fits and plan.estimate.total_gb < 14, str(plan)
        assert plan.config.gradient_checkpointing and plan.config.train_batch_size == 1
        assert not plan.lowered  # the SDXL preset values fit as they are
        reasons = {c.field: c.reason for c in plan.choices}
        assert "SDXL" in reasons["gradient_checkpointing"]
    text = str(plan.estimate)
    assert "text encoders 1+2 weights" in text and "1024 px" in text


def test_full_sdxl_on_a_t4_is_refused_with_use_lora():
    plan = plan_memory(sdxl(), T4, packages=WITH_BNB)
    assert not plan.fits and plan.estimate.total_gb > 20
    assert plan.config.train_text_encoder is False  # the preset already left CLIP out
    lora = [f for f in plan.fixes if f.fields == ("use_lora",)]
    assert lora and lora[0].estimate_gb < 14
    with pytest.raises(GpuMemoryError) as caught:
        enforce(plan)
    assert "use_lora: turn on Use LORA" in str(caught.value)
    reasons = {c.field: c.reason for c in plan.choices}
    assert "Use LORA" in reasons["train_text_encoder"]


@pytest.mark.parametrize("gpu", ["A100-80", "H100"])
def test_full_sdxl_fits_the_80_gb_presets(gpu):
    device = preset_device(next(p for p in PRESETS if p.name == gpu))
    plan = plan_memory(sdxl(), device, packages=WITH_BNB)
    assert plan.fits and not plan.lowered and plan.config.train_text_encoder, str(plan)
    assert plan.estimate.total_gb < AUTO_MARGIN * device.memory_gb


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.name != "CPU"],
                         ids=lambda p: p.name)
@pytest.mark.parametrize("lora", [False, True])
def test_every_preset_sizes_sdxl_for_its_gpu(preset, lora):
    """Each row's SDXL values fit its GPU with the fitting margin, except full fine-tuning
    on GPUs under 32 GB and LoRA on 8 GB (both text encoders stay on the GPU)."""
    device = preset_device(preset)
    assert choose_preset(device) is preset
    config = apply_preset(sdxl(use_lora=lora), device, family="SDXL")[0]
    total = estimate_peak_memory(config, device, sizes=SDXL_BASE, bitsandbytes=True).total_gb
    too_small = preset.memory_gb < (10 if lora else 30)
    assert (total <= AUTO_MARGIN * device.memory_gb) != too_small, (preset.name, lora, total)


def test_sdxl_costs_what_sdxl_costs():
    t4 = DeviceInfo("cuda", "Tesla T4", 14.7, False, 1, (7, 5))

    def total(config):
        return estimate_peak_memory(config, t4, sizes=SDXL_BASE, bitsandbytes=True,
                                    fixes=False).total_gb

    base = sdxl(use_lora=True, gradient_checkpointing=True, train_batch_size=1,
                train_text_encoder=False)
    reference = total(base)
    # Activations: ~9 GB per image at 1024 px without checkpointing, ~0.75 with it.
    assert total(base.copy(gradient_checkpointing=False)) - reference == pytest.approx(
        2 * (8.95 - 0.75), abs=0.3)
    assert total(base.copy(resolution=768)) < reference
    # The VAE in fp32 (SDXL's overflows in fp16) encoding 1024 px images when not cached.
    uncached = estimate_peak_memory(base.copy(cache_latents=False), t4, sizes=SDXL_BASE,
                                    bitsandbytes=True, fixes=False)
    vae = next(gb for label, gb in uncached.items if label.startswith("VAE"))
    assert vae > 4 and "fp32" in str(uncached)
    fixed = memory.ModelSizes(SDXL_BASE.unet, SDXL_BASE.text_encoder, SDXL_BASE.vae, "fixed",
                              SDXL_BASE.text_encoder_2, "SDXL", vae_fp32=False)
    half = estimate_peak_memory(base.copy(cache_latents=False), t4, sizes=fixed,
                                bitsandbytes=True, fixes=False)
    assert next(gb for label, gb in half.items if label.startswith("VAE")) < vae / 1.9
    other = estimate_peak_memory(  # the VAE field: SDXL's VAE fixed to run in fp16
        base.copy(cache_latents=False,
                  pretrained_vae_name_or_path="madebyollin/sdxl-vae-fp16-fix"),
        t4, sizes=SDXL_BASE, bitsandbytes=True, fixes=False)
    assert next(gb for label, gb in other.items if label.startswith("VAE")) < vae / 1.9
    a100 = DeviceInfo("cuda", "NVIDIA A100-SXM4-40GB", 39.4, True, 1, (8, 0))
    bf16 = estimate_peak_memory(base.copy(cache_latents=False), a100, sizes=SDXL_BASE,
                                bitsandbytes=True, fixes=False)  # bf16 has fp32's range
    assert next(gb for label, gb in bf16.items if label.startswith("VAE")) < vae / 1.9
    # Full fine-tuning with Train Text Encoder trains both encoders.
    full = sdxl(train_text_encoder=True, use_8bit_adam=True, gradient_checkpointing=True,
                train_batch_size=1)
    unet_only = full.copy(train_text_encoder=False)
    both = SDXL_BASE.text_encoder + SDXL_BASE.text_encoder_2
    assert total(full) - total(unet_only) > both * (4 + 4 + 2 - 2) / 2**30
    # SDXL on the same settings needs far more than SD 1.5.
    assert total(base) > 2 * estimate_peak_memory(base.copy(resolution=512), t4, sizes=SD15,
                                                  bitsandbytes=True).total_gb


def test_another_vae_upcasts_as_its_config_says(tmp_path):
    import json

    from colab_dreambooth.training.memory import vae_upcasts

    assert vae_upcasts("", SDXL_BASE) and not vae_upcasts("", SD15)
    folder = tmp_path / "fixed"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**SDXL_VAE, "force_upcast": False}))
    assert not vae_upcasts(str(folder), SDXL_BASE)
    (folder / "config.json").write_text(json.dumps(SDXL_VAE))
    assert vae_upcasts(str(folder), SDXL_BASE)
    single = tmp_path / "vae.safetensors"
    single.write_bytes(b"")
    assert vae_upcasts(str(single), SDXL_BASE)  # read with the base model's config
    assert vae_upcasts("someone/sdxl-vae", SDXL_BASE)
    assert not vae_upcasts("someone/sdxl-vae-fp16-fix", SDXL_BASE)
    assert not vae_upcasts("someone/sdxl-vae", SD15)  # SD's VAE runs in fp16


def test_resolution_fix_follows_the_family():
    assert smaller_resolution(1024, "SDXL") == 768 and smaller_resolution(768, "SDXL") == 512
    assert smaller_resolution(512, "SDXL") is None
    assert smaller_resolution(768) == 512 and smaller_resolution(512) is None
    fixes = memory_fixes(sdxl(use_lora=True, gradient_checkpointing=False), T4,
                         sizes=SDXL_BASE, bitsandbytes=True)
    resolution = [f for f in fixes if f.fields == ("resolution",)]
    assert resolution[0].changes == {"resolution": 768} and "lose detail" in resolution[0].label
    sd = memory_fixes(DreamBoothConfig(concepts_list=PRIOR, resolution=768), T4, sizes=SD15,
                      bitsandbytes=True)
    assert [f.label for f in sd if f.fields == ("resolution",)] == ["set Resolution to 512"]


def test_sd_models_keep_their_preset_values():
    """SD 1.x gets the same values as before SDXL; SDXL only the rows' overrides."""
    sd, _ = apply_preset(DreamBoothConfig(use_lora=True), T4)
    assert sd.gradient_checkpointing is False and sd.train_batch_size == 2
    xl, choices = apply_preset(sdxl(use_lora=True), T4, family="SDXL")
    assert xl.gradient_checkpointing is True and xl.train_batch_size == 1
    assert xl.mixed_precision == sd.mixed_precision and xl.use_8bit_adam is False
    assert all(c.reason for c in choices)


def test_env_names_the_family(tmp_path, capsys):
    from colab_dreambooth import cli
    from colab_dreambooth.config.params import save_params

    path = save_params(sdxl(use_lora=True), tmp_path / "p.json")
    assert cli.main(["env", "--config", str(path), "--gpu", "Tesla T4"]) == 0
    out = capsys.readouterr().out
    assert f"Model:        {SDXL_ID} (SDXL)" in out and "Preset: T4" in out
    assert "SDXL at 1024 px keeps ~9 GB" in out and "It will not fit" not in out


def test_gpu_benchmark_has_sdxl(capsys, one_thread):
    """``--family sdxl``: SDXL base's shapes from the benchmark's own configs (built here on
    the meta device), and a run of the tiny SDXL model through train()'s phases on the CPU."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_train.py"
    spec = importlib.util.spec_from_file_location("gpu_train_sdxl", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    unet, text, vae, _, tokenizers = bench.build_models(False, "meta", "sdxl")
    assert (_numel(unet), _numel(text), _numel(vae)) == (
        SDXL_BASE.unet, SDXL_BASE.text_encoders, SDXL_BASE.vae)
    assert [t.pad_token_id for t in tokenizers] == [49407, 0]
    assert bench.step_flops(1, 1024, SDXL_BASE.unet, 0, checkpointing=False, lora=True,
                            trains_text=False, sdxl=True) == pytest.approx(2 * 6.76e12)
    [result] = bench.main(["--tiny", "--cpu", "--preset", "T4", "--family", "sdxl", "--lora"])
    assert result["family"] == "sdxl" and result["s_per_step"] > 0
    assert result["checkpointing"] and result["batch"] == 1  # the T4's SDXL LoRA values
    assert "T4 SDXL LoRA | " in capsys.readouterr().out


def test_sdxl_activations_are_sd15s_times_the_counted_ratio(one_thread):
    """memory.py's SDXL figures: SD 1.5's measured ones times what the two UNets keep for the
    backward pass (benchmarks/count_activations.py, on the meta device)."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location("count_activations",
                                                      folder / "count_activations.py")
        counting = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(counting)
        found = counting.counts()
    finally:
        sys.path.remove(str(folder))
    ratio = found["SDXL"] / found["SD 1.5"]
    ratio_checkpointed = found["SDXL checkpointed"] / found["SD 1.5 checkpointed"]
    assert memory.SDXL_ACTIVATIONS_GB == pytest.approx(memory.ACTIVATIONS_GB * ratio, rel=0.02)
    assert memory.SDXL_ACTIVATIONS_CHECKPOINTED_GB == pytest.approx(
        memory.ACTIVATIONS_CHECKPOINTED_GB * ratio_checkpointed, rel=0.02)


def test_sdxl_disk_estimates_count_both_text_encoders():
    """Checkpoints, the saved folder and the export hold the second text encoder too: the
    fp16 export is SDXL base's real single file, 6.94 GB."""
    from colab_dreambooth.config.settings import DreamBoothConfig
    from colab_dreambooth.training.memory import SDXL_BASE
    from colab_dreambooth.training.space import checkpoint_bytes, export_bytes, model_bytes

    sizes = SDXL_BASE
    both = sizes.unet + sizes.text_encoder + sizes.text_encoder_2
    config = DreamBoothConfig(train_text_encoder=True, use_ema=False, optimizer="AdamW",
                              use_8bit_adam=False)
    assert checkpoint_bytes(config, sizes, eight_bit=False) == both * (4 + 8) + (1 << 20)
    assert model_bytes(config, sizes) == (both + sizes.vae) * 4 + (2 << 20)
    assert abs(export_bytes(sizes, fp16=True) / 1e9 - 6.94) < 0.01
