"""Export: a diffusers folder becomes one checkpoint in the original (LDM) layout.

The layout is checked independently of our own importer: diffusers' single-file loader must
read the export back to the same weights and images, and diffusers' LDM->diffusers converters
must map our names of a full-size SD 1.5 / 2.x model back onto every diffusers weight.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_convert import build_tiny_sd2, weights

from colab_dreambooth import cli
from colab_dreambooth.config.params import save_params
from colab_dreambooth.models.single_file import ldm_keys as ck
from colab_dreambooth.models.single_file.convert import convert_single_file
from colab_dreambooth.models.single_file.export import (
    ExportError,
    export_single_file,
)
from colab_dreambooth.models.single_file.model_configs import load_model_config, meta_model
from colab_dreambooth.models.tiny import tiny_model_path

FAKE_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz012345"


@pytest.fixture(scope="module")
def sd2_dir(tmp_path_factory) -> Path:
    return build_tiny_sd2(tmp_path_factory.mktemp("sd2") / "model")


@pytest.fixture
def trained(tiny_config, tmp_path) -> Path:
    """A folder laid out like ``train()``'s result: the model plus params/training info."""
    folder = tmp_path / "dreambooth" / "shs-girl" / "model"
    shutil.copytree(tiny_model_path(), folder)
    save_params(tiny_config, folder / "params.json")
    info = {"base_model": f"https://user:{FAKE_TOKEN}@example.com/base", "steps": 6,
            "total_steps": 6, "epochs": 1, "seed": 42, "ema": False,
            "instance_prompts": [c.instance_prompt for c in tiny_config.concepts_list],
            "saved_at": "2026-01-01T00:00:00+0000"}
    (folder / "training_info.json").write_text(json.dumps(info))
    return folder


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def generate(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of shs girl", num_inference_steps=1, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def test_export_layout_and_metadata(trained, tmp_path, tiny_config):
    report = export_single_file(trained, tmp_path / "shs.safetensors", progress=False)
    assert report.path == tmp_path / "shs.safetensors" and report.dtype == "fp32"
    tensors, meta = read(report.path)
    prefixes = (ck.UNET_PREFIX, ck.VAE_PREFIX, ck.CLIP_PREFIX)
    assert all(k.startswith(prefixes) for k in tensors)
    counts = {p: sum(k.startswith(p) for k in tensors) for p in prefixes}
    assert counts == {ck.UNET_PREFIX: len(weights(trained, "unet")),
                      ck.VAE_PREFIX: len(weights(trained, "vae")),
                      ck.CLIP_PREFIX: len(weights(trained, "text_encoder")) + 1}  # position_ids
    assert tensors["model.diffusion_model.output_blocks.2.1.conv.weight"].shape == (64, 64, 3, 3)
    assert tensors["model.diffusion_model.output_blocks.5.2.conv.weight"].shape == (64, 64, 3, 3)
    assert tensors["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert torch.equal(tensors[ck.CLIP_PREFIX + "embeddings.position_ids"], torch.arange(77)[None])
    assert all(t.dtype == torch.float32 for k, t in tensors.items() if "position_ids" not in k)
    # Training facts in the header, as strings; never a token.
    assert meta["colab_dreambooth.steps"] == "6"
    assert json.loads(meta["colab_dreambooth.instance_prompts"]) == \
        [c.instance_prompt for c in tiny_config.concepts_list]
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.title"] == "shs-girl"
    assert meta["colab_dreambooth.base_model"] == "https://user:<redacted>@example.com/base"
    assert json.loads(meta["colab_dreambooth.unet_config"])["block_out_channels"] == [32, 32, 64, 64]
    assert FAKE_TOKEN.encode() not in report.path.read_bytes()
    assert not list(tmp_path.glob(".shs*"))  # the temporary file is gone


def test_diffusers_single_file_loader_reads_the_export(trained, tmp_path):
    from diffusers import StableDiffusionPipeline

    path = export_single_file(trained, tmp_path / "m.safetensors", progress=False).path
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(trained),
                                                      local_files_only=True, safety_checker=None)
    original = StableDiffusionPipeline.from_pretrained(str(trained), safety_checker=None)
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(original, part).state_dict(), getattr(loaded, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert (generate(loaded) == generate(original)).all()


def test_ckpt_export_loads_weights_only(trained, tmp_path):
    sft = export_single_file(trained, tmp_path / "m.safetensors", progress=False).path
    ckpt = export_single_file(trained, tmp_path / "m.ckpt", progress=False).path
    loaded = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert set(loaded) == {"state_dict", "global_step", "metadata"}
    assert loaded["global_step"] == 6
    tensors, meta = read(sft)
    assert loaded["metadata"]["colab_dreambooth.steps"] == meta["colab_dreambooth.steps"]
    state = loaded["state_dict"]
    assert state.keys() == tensors.keys()
    assert all(torch.equal(state[k], tensors[k]) for k in state)
    assert FAKE_TOKEN.encode() not in ckpt.read_bytes()
    # A .ckpt holds each tensor alone, not the buffers it was cut from.
    assert ckpt.stat().st_size < sft.stat().st_size * 1.05


def test_fp16_export_round_trips_within_rounding(trained, tmp_path):
    path = export_single_file(trained, tmp_path / "half.safetensors", fp16=True,
                              progress=False).path
    tensors, meta = read(path)
    assert meta["colab_dreambooth.dtype"] == "fp16"
    assert {t.dtype for k, t in tensors.items() if "position_ids" not in k} == {torch.float16}
    convert_single_file(path, tmp_path / "back", progress=False)  # fp32 by default
    for part in ("unet", "vae", "text_encoder"):
        a, b = weights(trained, part), weights(tmp_path / "back", part)
        assert all(torch.equal(a[k].half().float(), b[k]) for k in a), part


def test_export_then_import_is_exact(trained, tmp_path):
    path = export_single_file(trained, tmp_path / "m.safetensors", progress=False).path
    convert_single_file(path, tmp_path / "back", progress=False)
    for part in ("unet", "vae", "text_encoder"):
        a, b = weights(trained, part), weights(tmp_path / "back", part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_ema_weights_on_request(trained, tmp_path):
    ema = trained / "unet_ema"
    shutil.copytree(trained / "unet", ema)
    file = next(ema.glob("*.safetensors"))
    save_file({k: v + 1 for k, v in load_file(file).items()}, file, metadata={"format": "pt"})
    plain = read(export_single_file(trained, tmp_path / "plain.safetensors", progress=False).path)
    averaged = read(export_single_file(trained, tmp_path / "ema.safetensors", ema=True,
                                       progress=False).path)
    assert averaged[1]["colab_dreambooth.unet_weights"] == "ema"
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(averaged[0][key], plain[0][key] + 1)
    vae_key = "first_stage_model.decoder.conv_out.weight"
    assert torch.equal(averaged[0][vae_key], plain[0][vae_key])
    shutil.rmtree(ema)
    with pytest.raises(ExportError, match="no EMA weights"):
        export_single_file(trained, tmp_path / "x.safetensors", ema=True, progress=False)


def test_sd2_export_uses_the_open_clip_layout(sd2_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    report = export_single_file(sd2_dir, tmp_path / "sd2.safetensors", progress=False)
    assert (report.version, report.prediction_type) == ("sd2", "v_prediction")
    tensors, meta = read(report.path)
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert meta["modelspec.prediction_type"] == "v"
    assert not any(k.startswith("cond_stage_model.transformer.") for k in tensors)
    te = weights(sd2_dir, "text_encoder")
    block = ck.OPEN_CLIP_PREFIX + "transformer.resblocks."
    fused = tensors[block + "1.attn.in_proj_weight"]
    assert fused.shape == (144, 48)
    assert torch.equal(fused, torch.cat([te[f"encoder.layers.1.self_attn.{p}_proj.weight"]
                                         for p in "qkv"]))
    assert torch.equal(tensors[block + "0.mlp.c_fc.weight"], te["encoder.layers.0.mlp.fc1.weight"])
    assert torch.equal(tensors[ck.OPEN_CLIP_PREFIX + "positional_embedding"],
                       te["embeddings.position_embedding.weight"])
    # OpenCLIP's unused last block, projection and logit scale are there for other tools.
    assert {int(k[len(block):].split(".")[0]) for k in tensors if k.startswith(block)} == {0, 1, 2, 3}
    assert torch.equal(tensors[block + "3.attn.in_proj_bias"], tensors[block + "2.attn.in_proj_bias"])
    assert torch.equal(tensors[ck.OPEN_CLIP_PREFIX + "text_projection"], torch.eye(48))
    assert tensors["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (32, 32)

    loaded = StableDiffusionPipeline.from_single_file(str(report.path), config=str(sd2_dir),
                                                      local_files_only=True, safety_checker=None)
    original = StableDiffusionPipeline.from_pretrained(str(sd2_dir), safety_checker=None)
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(original, part).state_dict(), getattr(loaded, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


@pytest.mark.parametrize("variant", ["sd1", "sd2-v"])
def test_full_size_names_match_diffusers_converters(variant):
    """Our names for a full-size model, fed to diffusers' own LDM->diffusers converters,
    land on every diffusers weight of the right shape (no weights needed: meta tensors)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    configs = load_model_config(variant)
    models = {part: meta_model(part, configs[part]) for part in ("unet", "vae", "text_encoder")}
    states = {part: m.state_dict() for part, m in models.items()}
    open_clip = variant != "sd1"
    links = (ck.unet_links(states["unet"], configs["unet"])
             + ck.vae_links(states["vae"], configs["vae"])
             + (ck.open_clip_links(states["text_encoder"], duplicate_last_layer=True) if open_clip
                else ck.clip_links(states["text_encoder"])))
    ldm = {}
    for link in links:
        part = ("unet" if link.ldm.startswith(ck.UNET_PREFIX) else
                "vae" if link.ldm.startswith(ck.VAE_PREFIX) else "text_encoder")
        tensors = [states[part][k] for k in link.diffusers]
        tensor = torch.cat(tensors) if link.fused else tensors[0]
        ldm[link.ldm] = tensor.reshape(*tensor.shape, 1, 1) if link.conv1x1 else tensor
    assert len(ldm) == len(links)
    if open_clip:
        ldm[ck.OPEN_CLIP_PREFIX + "text_projection"] = torch.empty(1024, 1024, device="meta")
        assert sum(".resblocks." in k and k.endswith("in_proj_weight") for k in ldm) == 24
    else:
        assert sum(k.startswith(ck.UNET_PREFIX) for k in ldm) == 686
    converted = {
        "unet": convert_ldm_unet_checkpoint(ldm, configs["unet"]),
        "vae": convert_ldm_vae_checkpoint(ldm, configs["vae"]),
        "text_encoder": (convert_open_clip_checkpoint(models["text_encoder"], ldm) if open_clip
                         else convert_ldm_clip_checkpoint(ldm)),
    }
    for part, state in states.items():
        got = {ck.strip_text_model(k): v for k, v in converted[part].items()
               if not k.endswith("position_ids")}
        want = {ck.strip_text_model(k): v for k, v in state.items()}
        assert got.keys() == want.keys(), part
        assert all(got[k].shape == want[k].shape for k in want), part


def test_bad_requests_are_clear_errors(trained, tmp_path):
    with pytest.raises(ExportError, match=r"must end in \.safetensors"):
        export_single_file(trained, tmp_path / "model.bin", progress=False)
    with pytest.raises(ExportError, match="not found"):
        export_single_file(tmp_path / "nothing", tmp_path / "m.safetensors", progress=False)
    half = tmp_path / "half"
    shutil.copytree(trained, half)
    shutil.rmtree(half / "vae")
    with pytest.raises(ExportError, match=r"missing vae/config\.json"):
        export_single_file(half, tmp_path / "m.safetensors", progress=False)
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(ExportError, match="already exists"):
        export_single_file(trained, out, progress=False)
    assert out.read_bytes() == b"precious"
    export_single_file(trained, out, overwrite=True, progress=False)
    assert read(out)[0]


def test_cli_export(trained, tmp_path, capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["export", str(trained), str(tmp_path / "m.ckpt"), "--fp16"])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Wrote {tmp_path / 'm.ckpt'} (") and "fp16" in out
    args = parser.parse_args(["export", str(trained), str(tmp_path / "m.ckpt")])
    assert args.run(args) == 1
    assert "already exists" in capsys.readouterr().err


def test_export_cli_writes_a_model_card(tmp_path, capsys):
    import shutil

    from colab_dreambooth.cli.parser import main
    from colab_dreambooth.config.concept import Concept
    from colab_dreambooth.config.params import save_params
    from colab_dreambooth.config.settings import DreamBoothConfig
    from colab_dreambooth.models.tiny import tiny_model_path

    model = tmp_path / "model"
    shutil.copytree(tiny_model_path(), model)
    save_params(DreamBoothConfig(pretrained_model_name_or_path="tiny", concepts_list=[
        Concept(instance_prompt="photo of zwx toy", instance_token="zwx")]),
        model / "params.json")
    out = tmp_path / "out" / "my-model.safetensors"
    assert main(["export", str(model), str(out), "--model-card"]) == 0
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert out.is_file() and "zwx" in card
    assert "Wrote the model card" in capsys.readouterr().out
