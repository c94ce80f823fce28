"""Lora Type (LoRA, LoCon, LoHa, LoKr) and Use DoRA: each trains on the tiny model, is saved in
the kohya/LyCORIS layout (checked against LyCORIS's own networks), reloads through diffusers or
peft with the trained model's output, is read by LyCORIS with the same output, and resumes
exactly."""

from __future__ import annotations

import copy
import threading
from types import SimpleNamespace

import pytest
import torch
from run_helpers import train_whole_and_killed
from safetensors.torch import load_file

from colab_dreambooth.config.params import params_from_dict
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.config.validation import lora_problems
from colab_dreambooth.demo import demo_config
from colab_dreambooth.errors import ModelLoadError
from colab_dreambooth.models.loading import load_components
from colab_dreambooth.models.lora import adapter_plan, load_adapters
from colab_dreambooth.models.lora_file import (
    file_adapter_type,
    file_modules,
    needs_peft_loader,
    read_lora,
    save_lora,
)
from colab_dreambooth.models.pipelines import load_lora_pipeline
from colab_dreambooth.training import saving as saving_module
from colab_dreambooth.training.train import train

PROMPT = "a photo of zwx toy"
# (Lora Type, Use DoRA): every type, and DoRA on both types that take it.
CASES = {"LoRA+DoRA": ("LoRA", True), "LoCon": ("LoCon", False), "LoCon+DoRA": ("LoCon", True),
         "LoHa": ("LoHa", False), "LoKr": ("LoKr", False)}
LYCORIS_ALGO = {"LoRA": "lora", "LoCon": "locon", "LoHa": "loha", "LoKr": "lokr"}


def outputs(unet, text_encoder, tokenizer) -> dict[str, torch.Tensor]:
    """Text-encoder states and one UNet prediction, seeded."""
    ids = tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = text_encoder(ids)[0]
        noise = unet(latents, 500, states).sample
    return {"states": states, "noise": noise}


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())))


def type_config(root, out, lora_type: str, dora: bool, **changes) -> DreamBoothConfig:
    # Equal UNet and text-encoder ranks: LyCORIS's networks take one linear rank.
    config = demo_config(root, steps=3).copy(
        models_root=str(out), model_name=f"zwx-{lora_type}{'-dora' if dora else ''}",
        use_lora=True, lora_type=lora_type, use_dora=dora, lora_unet_rank=4, lora_txt_rank=4,
        lora_alpha=2.0, lora_conv_rank=2, lora_conv_alpha=1.0, lora_learning_rate=1e-2,
        lora_txt_learning_rate=1e-2, train_batch_size=1, cache_latents=False)
    return config.copy(**changes)


@pytest.fixture(scope="module")
def tiny_parts():
    return load_components("tiny")


@pytest.fixture(scope="module")
def runs(demo_root, tmp_path_factory):
    """One 3-step run of each case, with the trained models' outputs at the final save."""
    done = {}
    for case, (lora_type, dora) in CASES.items():
        config = type_config(demo_root, tmp_path_factory.mktemp(case), lora_type, dora)
        captured: dict = {}
        original = saving_module.save_lora_model

        def spy(config, parts, unet, text_encoder, step, *rest, captured=captured,
                original=original):
            unet.eval()
            text_encoder.eval()
            captured.update(outputs(unet, text_encoder, parts.tokenizer))
            return original(config, parts, unet, text_encoder, step, *rest)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(saving_module, "save_lora_model", spy)
            result = train(config, progress=False)
        state, meta = read_lora(result.lora_file)
        done[case] = SimpleNamespace(config=config, result=result, captured=captured,
                                     state=state, meta=meta)
    return done


# ----------------------------------------------------------------------------- the file
@pytest.mark.parametrize("case", CASES)
def test_file_holds_the_types_tensors(runs, case):
    run = runs[case]
    lora_type, dora = CASES[case]
    assert file_adapter_type(run.state) == lora_type + ("+DoRA" if dora else "")
    assert run.meta["colab_dreambooth.lora_type"] == lora_type + ("+DoRA" if dora else "")
    assert run.meta["ss_network_module"] == ("networks.lora" if lora_type == "LoRA"
                                             else "lycoris.kohya")
    modules = file_modules(run.state)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in modules)
    convs = [k for k in modules if "_resnets_" in k and k.endswith(("conv1", "conv2"))]
    assert bool(convs) == (lora_type != "LoRA")  # conv rank 2: the 3x3 convolutions too
    trained = [m for m in modules.values() if any(float(t.abs().max()) > 0
                                                  for t in m.tensors.values())]
    assert len(trained) == len(modules)  # every factor moved or was non-zero from the start


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][0] != "LoRA"])
def test_keys_and_shapes_match_lycoris(runs, tiny_parts, case, tmp_path):
    """LyCORIS's own network of the same type, ranks and targets has exactly our keys and
    shapes (the text encoder's names aside: LyCORIS names transformers 5's flattened CLIP)."""
    kohya = pytest.importorskip("lycoris.kohya")
    run = runs[case]
    lora_type, dora = CASES[case]
    network = lycoris_network(kohya, tiny_parts, tmp_path, lora_type, dora)
    theirs = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    ours = {k.replace("lora_te_text_model_", "lora_te_"): tuple(v.shape)
            for k, v in run.state.items()}
    assert ours == theirs


def lycoris_network(kohya, parts, tmp_path, lora_type: str, dora: bool, *, weights=None,
                    algo: str | None = None, **options):
    """LyCORIS's kohya network on copies of the tiny UNet and text encoder, on kohya's
    LoCon targets (its "full" preset also adapts conv_in/conv_out and the time embedding)."""
    preset = tmp_path / "preset.toml"
    preset.write_text(
        'enable_conv = true\nunet_target_module = ["Transformer2DModel", "ResnetBlock2D", '
        '"Downsample2D", "Upsample2D"]\nunet_target_name = []\n'
        'text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]\n'
        'text_encoder_target_name = []\n', encoding="utf-8")
    unet, text_encoder = copy.deepcopy(parts.unet), copy.deepcopy(parts.text_encoder)
    if weights is None:
        network = kohya.create_network(1.0, 4, 2.0, parts.vae, text_encoder, unet,
                                       algo=algo or LYCORIS_ALGO[lora_type], conv_dim=2,
                                       conv_alpha=1.0, preset=str(preset),
                                       dora_wd=dora or options.pop("dora_wd", False), **options)
    else:
        network, _ = kohya.create_network_from_weights(1.0, None, parts.vae, text_encoder, unet,
                                                       weights_sd=weights, preset=str(preset))
    network.apply_to(text_encoder, unet, True, True)
    if weights is not None:
        network.load_state_dict(weights)
    return SimpleNamespace(unet=unet, text_encoder=text_encoder,
                           state_dict=network.state_dict,
                           named_parameters=network.named_parameters)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][0] != "LoRA"])
def test_lycoris_reads_the_file_with_the_trained_output(runs, tiny_parts, case, tmp_path):
    """LyCORIS (the layout's origin, whose loaders the WebUI and ComfyUI follow) applies our
    file and computes what the trained model computed: LoKr's folded scale and DoRA's
    magnitudes mean the same to it as to peft."""
    kohya = pytest.importorskip("lycoris.kohya")
    run = runs[case]
    weights = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in run.state.items()}
    network = lycoris_network(kohya, tiny_parts, tmp_path, *CASES[case], weights=weights)
    got = outputs(network.unet.eval(), network.text_encoder.eval(), tiny_parts.tokenizer)
    assert close(got["states"], run.captured["states"])
    assert close(got["noise"], run.captured["noise"])


# ----------------------------------------------------------------------------- reloading
@pytest.mark.parametrize("case", CASES)
def test_reload_reproduces_the_trained_model(runs, case):
    """The sampling path: diffusers' load_lora_weights for LoRA/LoCon, peft for DoRA, LoHa
    and LoKr (diffusers' Stable Diffusion loader drops dora_scale and reads neither)."""
    run = runs[case]
    assert needs_peft_loader(run.state) == (case != "LoCon")
    pipe = load_lora_pipeline("tiny", run.result.lora_file, device="cpu")
    got = outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    assert close(got["states"], run.captured["states"])
    assert close(got["noise"], run.captured["noise"])
    half = load_lora_pipeline("tiny", run.result.lora_file, device="cpu", scale=0.5)
    halfway = outputs(half.unet, half.text_encoder, half.tokenizer)["noise"]
    assert not close(halfway, run.captured["noise"])


@pytest.mark.parametrize("algo, options", [
    ("loha", {}), ("loha", {"use_tucker": True}), ("lokr", {"factor": 4}),
    ("lokr", {"factor": 8, "decompose_both": True}), ("lokr", {"full_matrix": True}),
    ("lokr", {"factor": 4, "use_tucker": True}), ("locon", {"dora_wd": True})])
def test_files_made_by_lycoris_load_with_lycoris_output(tiny_parts, tmp_path, algo, options):
    """Other people's LyCORIS files (any LoKr factor, Tucker cores, full matrices, DoRA) load
    through our peft loader and compute what LyCORIS computes with them."""
    kohya = pytest.importorskip("lycoris.kohya")
    network = lycoris_network(kohya, tiny_parts, tmp_path, "LoRA", False, algo=algo, **options)
    torch.manual_seed(1)
    with torch.no_grad():  # a "trained" network: every factor moved
        for name, weight in network.named_parameters():
            weight.mul_(1.1) if "dora_scale" in name else weight.add_(
                torch.randn_like(weight) * 0.05)
    expected = outputs(network.unet.eval(), network.text_encoder.eval(), tiny_parts.tokenizer)
    state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    unet, text_encoder = copy.deepcopy(tiny_parts.unet), copy.deepcopy(tiny_parts.text_encoder)
    assert load_adapters(state, unet, text_encoder) == len(file_modules(state))
    got = outputs(unet.eval(), text_encoder.eval(), tiny_parts.tokenizer)
    assert close(got["states"], expected["states"]) and close(got["noise"], expected["noise"])


def test_dora_magnitudes_per_input_channel_are_refused(tiny_parts, tmp_path):
    kohya = pytest.importorskip("lycoris.kohya")
    network = lycoris_network(kohya, tiny_parts, tmp_path, "LoCon", True, wd_on_output=False)
    state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    with pytest.raises(ModelLoadError, match="per input channel"):
        load_adapters(state, copy.deepcopy(tiny_parts.unet),
                      copy.deepcopy(tiny_parts.text_encoder))


def test_peft_loader_reads_a_plain_lora_as_diffusers_does(runs, tiny_parts):
    """load_adapters on a LoCon file (no DoRA) computes what diffusers' loader computes."""
    run = runs["LoCon"]
    unet, text_encoder = copy.deepcopy(tiny_parts.unet), copy.deepcopy(tiny_parts.text_encoder)
    assert load_adapters(run.state, unet, text_encoder) == len(file_modules(run.state))
    got = outputs(unet.eval(), text_encoder.eval(), tiny_parts.tokenizer)
    assert close(got["noise"], run.captured["noise"])


def test_a_file_for_another_model_is_refused(runs, tiny_parts):
    state = dict(runs["LoHa"].state)
    state["lora_unet_down_blocks_9_attentions_0_proj_in.hada_w1_a"] = torch.zeros(4, 4)
    for part in ("hada_w1_b", "hada_w2_a", "hada_w2_b"):
        state[f"lora_unet_down_blocks_9_attentions_0_proj_in.{part}"] = torch.zeros(4, 4)
    with pytest.raises(ModelLoadError, match="not in this model"):
        load_adapters(state, copy.deepcopy(tiny_parts.unet),
                      copy.deepcopy(tiny_parts.text_encoder))
    with pytest.raises(ModelLoadError, match="IA3, OFT"):
        file_modules({"lora_unet_x.oft_blocks": torch.zeros(1)})


def test_lokr_without_low_rank_factors_folds_its_scale(runs):
    """Full lokr_w1/lokr_w2 pairs: LyCORIS applies them at scale 1, so alpha is the rank's
    and the scale sits in w2."""
    run = runs["LoKr"]
    full = [k for k in file_modules(run.state).values() if "lokr_w2" in k.tensors]
    decomposed = [k for k in file_modules(run.state).values() if "lokr_w2_a" in k.tensors]
    assert full and decomposed  # rank 4: full on 32-wide layers, low-rank on wider ones


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("case", CASES)
def test_each_type_resumes_exactly(demo_root, tmp_path, case):
    lora_type, dora = CASES[case]
    changes = dict(max_train_steps=4, save_every_steps=0, use_ema=False,
                   gradient_accumulation_steps=1, save_state_every_steps=0)
    changes = {k: v for k, v in changes.items() if hasattr(DreamBoothConfig, k)}
    whole = train(type_config(demo_root, tmp_path / "whole", lora_type, dora, **changes),
                  progress=False)
    config = type_config(demo_root, tmp_path / "split", lora_type, dora, **changes)
    stop = threading.Event()
    first = train(config, stop=stop, progress=False,
                  on_step=lambda step, loss, lr: step == 2 and stop.set())
    saved = load_file(first.checkpoint / "unet.safetensors")
    assert saved and all(("lora_" in k or "hada_" in k or "lokr_" in k) for k in saved)
    second = train(config, resume=True, progress=False)
    assert second.losses == whole.losses
    a, b = load_file(whole.lora_file), load_file(second.lora_file)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- settings
def test_dora_and_conv_rank_apply_only_where_they_mean_something(tiny_config):
    base = tiny_config.copy(use_lora=True, use_ema=False)
    assert lora_problems(base.copy(lora_type="LoHa", use_dora=True))[0].where == "use_dora"
    assert lora_problems(base.copy(lora_type="LoCon", lora_conv_rank=0))[0].where == \
        "lora_conv_rank"
    assert lora_problems(base.copy(lora_type="LoKr", lora_conv_rank=0)) == []
    assert lora_problems(base.copy(lora_type="LoCon", use_dora=True)) == []


def test_plans_follow_kohya(tiny_parts):
    plain = adapter_plan(tiny_parts.unet, "LoRA", text_encoder=False)
    assert plain.conv == () and all(n.rsplit(".", 2)[-2:][0] in ("attn1", "attn2", "to_out")
                                    for n in plain.linear)
    locon = adapter_plan(tiny_parts.unet, "LoCon", text_encoder=False, conv=True)
    assert any(n.endswith("ff.net.2") for n in locon.linear)
    assert any(n.endswith("proj_in") for n in locon.linear)  # a 1x1 conv: the linear rank
    assert any(n.endswith("time_emb_proj") for n in locon.linear)
    assert any(n.endswith("resnets.0.conv1") for n in locon.conv)
    assert any(n.endswith("downsamplers.0.conv") for n in locon.conv)
    no_conv = adapter_plan(tiny_parts.unet, "LoHa", text_encoder=False, conv=False)
    assert no_conv.conv == () and not any("resnets" in n for n in no_conv.linear)
    text = adapter_plan(tiny_parts.text_encoder, "LoKr", text_encoder=True)
    assert any(n.endswith("mlp.fc1") for n in text.linear)


def test_extension_lora_extended_reads_as_locon():
    loaded = params_from_dict({"use_lora": True, "use_lora_extended": True,
                               "lora_unet_rank": 8})
    assert loaded.config.lora_type == "LoCon" and loaded.config.lora_conv_rank == 8
    assert any("use_lora_extended" in note for note in loaded.notes)


def test_saving_an_adapter_file_is_atomic_for_every_type(runs, tmp_path):
    target = tmp_path / "x.safetensors"
    save_lora(target, runs["LoHa"].state, {"a": "b"})
    assert read_lora(target)[0].keys() == runs["LoHa"].state.keys()
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_memory_figures_are_sd15s_adapted_layers():
    """The estimator's per-rank figures are the in + out features of the layers adapter_plan
    picks on SD 1.5's shapes (built on the meta device: no weights)."""
    import json
    from pathlib import Path

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import colab_dreambooth.models.single_file as single_file
    from colab_dreambooth.training import memory

    configs = json.loads((Path(single_file.__file__).parent / "configs" / "sd1.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**{
            k: v for k, v in configs["text_encoder"].items() if not k.startswith("_")}))

    def in_out(model, names):
        return sum(model.get_submodule(n).weight.shape[0] + model.get_submodule(n).weight[0].numel()
                   for n in names)

    def outs(model, names):
        return sum(model.get_submodule(n).weight.shape[0] for n in names)

    lora = adapter_plan(unet, "LoRA", text_encoder=False)
    lora_text = adapter_plan(text_encoder, "LoRA", text_encoder=True)
    locon = adapter_plan(unet, "LoCon", text_encoder=False, conv=True)
    locon_text = adapter_plan(text_encoder, "LoCon", text_encoder=True)
    assert in_out(unet, lora.linear) == memory.LORA_UNET_PER_RANK
    assert in_out(text_encoder, lora_text.linear) == memory.LORA_TEXT_PER_RANK
    assert in_out(unet, locon.linear) == memory.LOCON_UNET_PER_RANK
    assert in_out(unet, locon.conv) == memory.LOCON_CONV_PER_RANK
    assert in_out(text_encoder, locon_text.linear) == memory.LOCON_TEXT_PER_RANK
    assert memory.DORA_MAGNITUDES == {
        "LoRA": (outs(unet, lora.modules), outs(text_encoder, lora_text.modules)),
        "LoCon": (outs(unet, locon.modules), outs(text_encoder, locon_text.modules))}


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_size_estimate_follows_the_type(runs, case):
    """On the tiny model the estimate is within 2x of the file's real count (LoKr: a bound)."""
    from colab_dreambooth.training.memory import adapter_parameters, model_sizes

    run = runs[case]
    real = sum(v.numel() for k, v in run.state.items() if not k.endswith(".alpha"))
    estimate = adapter_parameters(run.config, model_sizes(run.config.base_model))
    assert real <= estimate * 2 and (CASES[case][0] == "LoKr" or estimate <= real * 2)


def test_model_card_names_the_type_and_a_loader_that_reads_it(runs):
    from colab_dreambooth.publish.model_card import write_model_card

    for case, expect_peft in (("LoHa", True), ("LoCon", False)):
        run = runs[case]
        card = write_model_card(run.result.lora_file.parent).read_text(encoding="utf-8")
        assert f"| LoRA type | {CASES[case][0]} |" in card and "Conv rank / alpha" in card
        assert ("load_lora_pipeline(" in card) == expect_peft
        assert ("load_lora_weights(" in card) != expect_peft


def test_a_type_written_in_another_case_reads_as_declared():
    loaded = params_from_dict({"use_lora": True, "lora_type": "locon", "mixed_precision": "FP16"})
    assert loaded.config.lora_type == "LoCon" and loaded.config.mixed_precision == "fp16"
    assert params_from_dict({"lora_type": "lycoris"}).config.lora_type == "lycoris"  # refused later


def test_sigkill_mid_run_then_resume_matches_for_dora_locon(demo_root, tmp_path):
    """A real process training LoCon + DoRA (convolutions, magnitudes, both models), killed
    with SIGKILL after a checkpoint and resumed with ``train --resume``, writes the file of a
    run that was never interrupted."""
    base = type_config(demo_root, tmp_path, "LoCon", True).copy(
        max_train_steps=10, seed=99, hflip=True, gradient_accumulation_steps=1,
        save_every_steps=2, checkpoints_to_keep=2, save_preview_every=0,
        save_preview_every_steps=0)
    whole_run, killed_run = train_whole_and_killed(base, tmp_path)
    whole = load_file(whole_run / "lora" / "whole.safetensors")
    killed = load_file(killed_run / "lora" / "killed.safetensors")
    assert whole.keys() == killed.keys() and any(k.endswith("dora_scale") for k in whole)
    assert all(torch.equal(whole[k], killed[k]) for k in whole)
