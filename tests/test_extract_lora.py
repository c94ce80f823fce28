"""extract-lora on the tiny model: kohya's layout, diffusers reproduces the fine-tuning, the
text encoder left out when unchanged, refusals, and the command line."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from colab_dreambooth.cli.parser import main
from colab_dreambooth.errors import ModelLoadError, UserError
from colab_dreambooth.models.lora_extract import (
    ExtractError,
    default_output,
    extract_lora,
    target_layers,
)
from colab_dreambooth.models.lora_file import read_lora, state_for_diffusers
from colab_dreambooth.models.low_rank import low_rank_factors, relative_error, top_singular
from colab_dreambooth.models.tiny import tiny_model_path

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
TE_FILE = "text_encoder/model.safetensors"
CHANGE_RANK = 2
# Weights the "fine-tuning" changes: attention, feed-forward, 1x1 projections (kohya's default
# targets), a ResNet's time projection and 3x3 convs, a downsampler (the conv targets).
UNET_CHANGED = ("attn1.to_q.", "attn2.to_k.", "attn2.to_out.0.", "ff.net.0.proj.", "ff.net.2.",
                "proj_in.", "resnets.0.conv1.", "resnets.1.time_emb_proj.",
                "downsamplers.0.conv.")
TE_CHANGED = ("self_attn.q_proj.", "self_attn.out_proj.", "mlp.fc1.")

pytestmark = pytest.mark.usefixtures("one_thread")


def _low_rank_change(weight: torch.Tensor, g: torch.Generator, scale: float) -> torch.Tensor:
    out_dim, in_dim = weight.shape[0], weight[0].numel()
    change = torch.randn(out_dim, CHANGE_RANK, generator=g) @ torch.randn(CHANGE_RANK, in_dim,
                                                                          generator=g)
    return weight + scale * change.reshape(weight.shape) / CHANGE_RANK ** 0.5


def make_tuned(target: Path, *, te_scale: float = 0.05, seed: int = 0) -> Path:
    """A copy of the tiny model with a known rank-2 change in some UNet layers (and the text
    encoder's, by ``te_scale``; 0: unchanged), as a fully fine-tuned model is saved."""
    shutil.copytree(tiny_model_path(), target)
    g = torch.Generator().manual_seed(seed)
    for rel, changed, scale in ((UNET_FILE, UNET_CHANGED, 0.05), (TE_FILE, TE_CHANGED, te_scale)):
        if not scale:
            continue
        state = load_file(target / rel)
        for name, tensor in state.items():
            if name.endswith(".weight") and tensor.dim() >= 2 and any(c in name for c in changed):
                state[name] = _low_rank_change(tensor, g, scale)
        save_file(state, target / rel, metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("extract")


@pytest.fixture(scope="module")
def tuned(work) -> Path:
    return make_tuned(work / "tuned")


@pytest.fixture(scope="module")
def extracted(tuned, work):
    """Rank 4 (above the change's 2), conv rank 4, no clamping, fp32: a faithful LoRA."""
    return extract_lora("tiny", tuned, work / "exact.safetensors", rank=4, conv_rank=4,
                        clamp_quantile=1.0, save_precision="fp32", progress=False)


def _sha(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- the file


def test_keys_and_shapes_follow_kohyas_layout(tuned, work, extracted):
    report = extract_lora("tiny", tuned, work / "layout.safetensors", rank=4, conv_rank=3,
                          progress=False)
    state, meta = read_lora(report.path)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert state[f"{q}.lora_down.weight"].shape == (4, 32)
    assert state[f"{q}.lora_up.weight"].shape == (32, 4)
    assert float(state[f"{q}.alpha"]) == 4.0
    assert state[f"{q}.lora_down.weight"].dtype == torch.float16  # the default precision
    proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in"  # SD 1.x: a 1x1 conv
    assert state[f"{proj_in}.lora_down.weight"].shape == (4, 32, 1, 1)
    assert state[f"{proj_in}.lora_up.weight"].shape == (32, 4, 1, 1)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"  # LoCon: a 3x3 kernel at the conv rank
    assert state[f"{conv}.lora_down.weight"].shape == (3, 32, 3, 3)
    assert state[f"{conv}.lora_up.weight"].shape == (32, 3, 1, 1)
    assert float(state[f"{conv}.alpha"]) == 3.0
    assert "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight" in state
    assert "lora_unet_down_blocks_0_resnets_1_time_emb_proj.lora_up.weight" in state
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # CLIP's text_model. kept
    assert state[f"{te}.lora_down.weight"].shape == (4, 32)
    # Unchanged layers are left out; nothing outside kohya's targets (conv_in, norms) is in.
    assert not any("to_v" in k or "conv_in" in k or "norm" in k for k in state)
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "4.0")
    assert meta["ss_network_args"] == '{"conv_dim": "3", "conv_alpha": "3.0"}'
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v1", "False")
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_sd_model_name"] == "tiny" and meta["colab_dreambooth.extracted_from"] == "tuned"
    assert "extracted" in meta["ss_training_comment"]
    assert not any(str(work) in value for value in meta.values())  # no path of this machine
    # kohya's default 0.99 clamp costs accuracy (here a lot: the test's change is large next
    # to the weights, so U*S dwarfs Vh); the report says so, layer by layer.
    mean, worst, key = report.error_summary()
    assert 0.0 < mean <= worst <= 1.0 and key in report.errors
    assert extracted.error_summary()[1] < 1e-4 < mean  # no clamping, fp32: exact


def test_rank_is_capped_per_layer_and_clamping_follows_kohya():
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(8, 5, generator=g)
    up, down = low_rank_factors(delta, 32, 1.0)
    assert up.shape == (8, 5) and down.shape == (5, 5)  # rank capped at the smaller side
    assert relative_error(delta, up, down) < 1e-5
    free_up, free_down = low_rank_factors(delta, 3, 1.0)
    up, down = low_rank_factors(delta, 3, 0.9)
    # kohya: both factors clamped to +-(the 0.9 quantile of their signed values together)
    high = torch.quantile(torch.cat([free_up.flatten(), free_down.flatten()]), 0.9)
    assert torch.allclose(up, free_up.clamp(-high, high), atol=1e-6)
    assert torch.allclose(down, free_down.clamp(-high, high), atol=1e-6)
    assert not torch.allclose(up, free_up)
    conv = torch.randn(6, 4, 3, 3, generator=g)
    up, down = low_rank_factors(conv, 36, 1.0)
    assert up.shape == (6, 4, 1, 1) and down.shape == (4, 4, 3, 3)  # min(out, in) as kohya


@pytest.mark.parametrize("shape", [(40, 300), (300, 40), (64, 64)])
def test_cpu_singular_triplets_match_lapacks(shape):
    """The CPU path (float64 Gram eigenvectors) gives LAPACK's best rank-k approximation."""
    g = torch.Generator().manual_seed(2)
    matrix = torch.randn(*shape, generator=g) * torch.logspace(0, -3, shape[1])  # decaying
    u, s, vh = top_singular(matrix, 8, dtype=torch.float64)
    ref_u, ref_s, ref_vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    assert torch.allclose(s.double(), ref_s[:8], rtol=1e-5)
    best = ref_u[:, :8] * ref_s[:8] @ ref_vh[:8]
    assert torch.allclose((u * s @ vh).double(), best, atol=1e-5 * float(ref_s[0]))
    assert torch.allclose(u.T @ u, torch.eye(8), atol=1e-5)
    assert torch.allclose(vh @ vh.T, torch.eye(8), atol=1e-5)


# ----------------------------------------------------------------------------- faithful


def _outputs(lora_files: list[Path], tuned: Path) -> dict[str, torch.Tensor]:
    """UNet and text-encoder outputs of the tuned model, of the base, and of the base with
    each LoRA file loaded by diffusers' own ``load_lora_weights`` (in its kohya converter)."""
    from diffusers import StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(tiny_model_path(), safety_checker=None)
    tuned_pipe = StableDiffusionPipeline.from_pretrained(tuned, safety_checker=None)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 1000, (2, 77), generator=g)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    found = {}
    with torch.no_grad():
        found["te_tuned"] = hidden = tuned_pipe.text_encoder(ids)[0]
        found["unet_tuned"] = tuned_pipe.unet(sample, 10, hidden).sample
        found["unet_base"] = base.unet(sample, 10, hidden).sample
        found["te_base"] = base.text_encoder(ids)[0]
        for n, file in enumerate(lora_files):
            base.load_lora_weights(state_for_diffusers(read_lora(file)[0], base.text_encoder))
            found[f"te_{n}"] = base.text_encoder(ids)[0]
            found[f"unet_{n}"] = base.unet(sample, 10, hidden).sample  # the tuned encoding
            base.unload_lora_weights()
    return found


def test_diffusers_reproduces_the_fine_tuned_model(extracted, tuned, work):
    assert extracted.text_encoder and extracted.layers["text_encoder"] > 0
    assert extracted.error_summary()[1] < 1e-4  # rank >= the change's, no clamp, fp32
    no_conv = extract_lora("tiny", tuned, work / "no-conv.safetensors", rank=4,
                           clamp_quantile=1.0, save_precision="fp32", progress=False)
    out = _outputs([extracted.path, no_conv.path], tuned)
    change = float((out["unet_tuned"] - out["unet_base"]).abs().max())
    assert change > 1e-2  # the fine-tuning changed the output: the comparison means something
    assert float((out["unet_0"] - out["unet_tuned"]).abs().max()) < 1e-3 * max(1.0, change)
    assert torch.allclose(out["te_0"], out["te_tuned"], atol=1e-4, rtol=1e-4)
    # Without the conv rank the 3x3 convs' change is missing: diffusers did load them above.
    assert float((out["unet_1"] - out["unet_tuned"]).abs().max()) > 0.05 * change


def test_from_a_real_training_run(tiny_config, tmp_path):
    """A real full fine-tune (a few steps, UNet and text encoder) extracted from its run
    folder at a rank as high as the tiny model's layers: diffusers' outputs are those of the
    base with the tuned weights of exactly kohya's target layers (a LoRA holds no biases, norms
    or embeddings, which a full fine-tune trains too)."""
    from colab_dreambooth.training.train import train

    result = train(tiny_config.copy(max_train_steps=4), progress=False)
    run = result.model_dir.parent
    # A few small steps change the text encoder by less than kohya's min_diff (0.01): it is
    # left out by default, and min_diff=0 keeps it.
    assert not extract_lora("tiny", run, tmp_path / "default.safetensors", rank=4,
                            progress=False).text_encoder
    report = extract_lora("tiny", run, rank=64, clamp_quantile=1.0, min_diff=0.0,
                          save_precision="fp32", progress=False)
    assert report.path == run / f"{run.name}_extracted_r64.safetensors"
    assert report.text_encoder and report.layers["unet"] > 100
    state, _ = read_lora(report.path)
    # Rank 64 is above most tiny layers' width: capped there, zero-padded to one rank.
    assert state["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] \
        .shape == (64, 32)

    targets = {layer.weight for layer in target_layers(tiny_model_path(), conv=False)}
    reference = tmp_path / "base-with-tuned-targets"
    shutil.copytree(tiny_model_path(), reference)
    for rel in (UNET_FILE, TE_FILE):
        base_state, tuned_state = load_file(reference / rel), load_file(result.model_dir / rel)
        save_file({name: tuned_state[name] if name.removeprefix("text_model.") in targets
                   else tensor for name, tensor in base_state.items()}, reference / rel)
    out = _outputs([report.path], reference)
    assert (out["unet_tuned"] - out["unet_base"]).abs().max() > 1e-4  # it trained
    assert torch.allclose(out["unet_0"], out["unet_tuned"], atol=1e-4, rtol=1e-3)
    assert (out["te_tuned"] - out["te_base"]).abs().max() > 1e-5
    assert torch.allclose(out["te_0"], out["te_tuned"], atol=1e-5, rtol=1e-4)


def test_text_encoder_left_out_when_unchanged(work):
    unet_only = make_tuned(work / "unet-only", te_scale=0.0)
    report = extract_lora("tiny", unet_only, work / "unet-only.safetensors", rank=2,
                          progress=False)
    state, meta = read_lora(report.path)
    assert not report.text_encoder and report.text_encoder_max_diff == 0.0
    assert not any(k.startswith("lora_te_") for k in state)
    assert meta["ss_network_train_unet_only"] == "True"
    assert "text_encoder left out" in report.summary()

    # A change below min_diff is left out too (kohya's rule), unless min_diff is lowered.
    small = make_tuned(work / "small-te", te_scale=1e-4)
    report = extract_lora("tiny", small, work / "small.safetensors", rank=2, progress=False)
    assert not report.text_encoder and 0.0 < report.text_encoder_max_diff <= 0.01
    report = extract_lora("tiny", small, work / "small0.safetensors", rank=2, min_diff=0.0,
                          progress=False)
    assert report.text_encoder and report.layers["text_encoder"] == 2 * len(TE_CHANGED)


def test_from_single_files(tuned, extracted, tmp_path):
    """Base and tuned as single .safetensors files (converted once, beside them): the same
    LoRA as from the diffusers folders."""
    from colab_dreambooth.models.single_file.export import export_single_file

    export_single_file(tiny_model_path(), tmp_path / "base.safetensors", fp16=False)
    export_single_file(tuned, tmp_path / "tuned.safetensors", fp16=False)
    report = extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors",
                          rank=4, conv_rank=4, clamp_quantile=1.0, save_precision="fp32",
                          progress=False)
    assert report.path == tmp_path / "tuned_extracted_r4_c4.safetensors"
    got, meta = read_lora(report.path)
    want, _ = read_lora(extracted.path)
    assert got.keys() == want.keys()
    for key in (k for k in want if k.endswith(".lora_down.weight")):  # up to the SVD's signs
        up = key.replace("lora_down", "lora_up")
        product = (got[up].flatten(1) @ got[key].flatten(1))
        assert torch.allclose(product, want[up].flatten(1) @ want[key].flatten(1), atol=1e-5)
    assert meta["ss_sd_model_name"] == "base.safetensors"


# ----------------------------------------------------------------------------- refusals


def test_refuses_identical_models(work):
    copy = work / "copy"
    shutil.copytree(tiny_model_path(), copy)
    with pytest.raises(ExtractError, match="nothing to extract"):
        extract_lora("tiny", copy, work / "none.safetensors", progress=False)
    with pytest.raises(ExtractError, match="same model"):
        extract_lora("tiny", tiny_model_path(), work / "none.safetensors", progress=False)
    assert not (work / "none.safetensors").exists()


def test_refuses_another_architecture_naming_the_layer(work):
    other = work / "other-arch"
    shutil.copytree(tiny_model_path(), other)
    state = load_file(other / UNET_FILE)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    state[name] = torch.zeros(state[name].shape[0], 48)  # as if cross_attention_dim differed
    save_file(state, other / UNET_FILE)
    with pytest.raises(ModelLoadError,
                       match=r"attn2\.to_k\.weight is 32x48 in the tuned model and 32x32 in"):
        extract_lora("tiny", other, work / "mismatch.safetensors", progress=False)

    # SD 2.x's UNet has Linear proj_in/proj_out where SD 1.x has 1x1 convs.
    from diffusers import UNet2DConditionModel

    sd2_like = work / "sd2-like"
    shutil.copytree(tiny_model_path(), sd2_like)
    config = UNet2DConditionModel.load_config(sd2_like / "unet")
    UNet2DConditionModel.from_config({**config, "use_linear_projection": True}).save_pretrained(
        sd2_like / "unet")
    with pytest.raises(ModelLoadError, match=r"proj_in\.weight is 32x32 in the tuned model and "
                                             r"32x32x1x1 in the base"):
        extract_lora("tiny", sd2_like, work / "mismatch.safetensors", progress=False)
    assert not (work / "mismatch.safetensors").exists()


def test_refuses_an_existing_output_and_bad_numbers(tuned, work):
    out = work / "exists.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(ExtractError, match="already exists"):
        extract_lora("tiny", tuned, out, progress=False)
    assert out.read_bytes() == b"keep me"
    with pytest.raises(ExtractError, match="already exists"):  # before loading anything
        extract_lora("tiny", work / "no" / "such-model", out, progress=False)
    with pytest.raises(ExtractError, match="rank must be"):
        extract_lora("tiny", tuned, work / "x.safetensors", rank=0)
    with pytest.raises(ExtractError, match="clamp quantile"):
        extract_lora("tiny", tuned, work / "x.safetensors", clamp_quantile=1.5)
    with pytest.raises(ExtractError, match="inside the model folder"):
        extract_lora("tiny", tuned, tuned / "x.safetensors")
    assert isinstance(ExtractError("x"), UserError)
    lora = work / "lora-run"
    (lora / "lora").mkdir(parents=True)
    (lora / "lora" / "training_info.json").write_text(
        '{"lora": true, "lora_file": "x.safetensors", "base_model": "tiny"}')
    with pytest.raises(ExtractError, match="is a LoRA run"):
        extract_lora("tiny", lora, work / "x.safetensors")


def test_models_are_not_modified(work):
    tuned = make_tuned(work / "untouched", seed=3)
    before = (_sha(tiny_model_path()), _sha(tuned))
    extract_lora("tiny", tuned, work / "untouched.safetensors", rank=2, conv_rank=2,
                 progress=False)
    assert (_sha(tiny_model_path()), _sha(tuned)) == before


def test_default_output_sits_beside_the_tuned_model(tmp_path):
    run = tmp_path / "my-dog"
    (run / "model").mkdir(parents=True)
    (run / "model" / "model_index.json").write_text("{}")
    assert default_output(run, 32) == run / "my-dog_extracted_r32.safetensors"
    assert default_output(run / "model", 8, 4) == run / "my-dog_extracted_r8_c4.safetensors"
    file = tmp_path / "dog.safetensors"
    file.write_bytes(b"")
    assert default_output(file, 16) == tmp_path / "dog_extracted_r16.safetensors"
    hub = default_output("someone/dog-model", 4)  # a Hub id: into the current folder
    assert hub == Path.cwd() / "dog-model_extracted_r4.safetensors"


# ----------------------------------------------------------------------------- the CLI


def test_cli_end_to_end(work, capsys):
    run = work / "cli-run"
    run.mkdir()
    make_tuned(run / "model", seed=5)  # a run's working folder: <run>/model
    assert main(["extract-lora", "tiny", str(run), "--rank", "4", "--conv-rank", "2"]) == 0
    written = run / "cli-run_extracted_r4_c2.safetensors"
    assert written.is_file() and "Wrote" in capsys.readouterr().out
    state, meta = read_lora(written)
    assert meta["ss_network_dim"] == "4" and any(".lora_up." in k for k in state)

    assert main(["extract-lora", "tiny", str(run), "--rank", "4", "--conv-rank", "2"]) == 1
    assert "already exists" in capsys.readouterr().err
    out = work / "cli.safetensors"
    assert main(["extract-lora", "tiny", str(run / "model"), "--out", str(out), "--rank", "2",
                 "--save-precision", "bf16", "--clamp-quantile", "1", "--min-diff", "0.5",
                 "--overwrite"]) == 0
    state, _ = read_lora(out)
    assert state[next(iter(state))].dtype == torch.bfloat16
    assert not any(k.startswith("lora_te_") for k in state)  # te change 0.05 < min diff 0.5

    assert main(["extract-lora", "tiny", "tiny", "--out", str(work / "same.safetensors")]) == 1
    assert "same model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["extract-lora", "tiny", str(run), "--rank", "0"])
    assert exit_info.value.code == 2
