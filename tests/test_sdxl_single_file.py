"""SDXL single files: export, Create Model, diffusers' own loader, refusals, dehydrate.

The tiny SDXL model (SDXL's topology at tiny widths) is exported to the original (LDM/SGM)
layout and read back by our importer and, independently, by diffusers' single-file converters;
the names of a full-size SDXL base are checked against diffusers' converters on the meta device.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_convert import weights
from test_dehydrate import assert_bit_identical

from colab_dreambooth.models.families import SDXL, detect_family, file_family, folder_family
from colab_dreambooth.models.loading import load_components
from colab_dreambooth.models.single_file import convert as convert_module
from colab_dreambooth.models.single_file import ldm_keys as ck
from colab_dreambooth.models.single_file.base_weights import base_fingerprint
from colab_dreambooth.models.single_file.convert import convert_single_file
from colab_dreambooth.models.single_file.dehydrate import dehydrate
from colab_dreambooth.models.single_file.export import export_single_file
from colab_dreambooth.models.single_file.model_configs import (
    load_model_config,
    meta_model,
    write_config_folder,
)
from colab_dreambooth.models.single_file.readers import ModelFileError, TensorFile
from colab_dreambooth.models.single_file.rehydrate import rehydrate
from colab_dreambooth.models.tiny import tiny_sdxl_model_path

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
TE2 = ck.SDXL_OPEN_CLIP_PREFIX

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sdxl")


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_sdxl_model_path()


@pytest.fixture(scope="module")
def exported(tiny, work) -> Path:
    return export_single_file(tiny, work / "tiny-sdxl.safetensors", progress=False).path


@pytest.fixture(scope="module")
def converted(exported, work) -> Path:
    convert_single_file(exported, work / "back", progress=False)
    return work / "back"


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def generate(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of shs girl", num_inference_steps=2, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def build_wide_sdxl(folder: Path, tiny: Path) -> Path:
    """The tiny SDXL model with a wider second text encoder (48 instead of 32) and a UNet made
    for it: diffusers' single-file loader tells SDXL's two encoders apart by their widths."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    shutil.copytree(tiny, folder)
    te2 = json.loads((tiny / "text_encoder_2" / "config.json").read_text())
    unet = json.loads((tiny / "unet" / "config.json").read_text())
    with torch.random.fork_rng():
        torch.manual_seed(3)
        config = {k: v for k, v in te2.items() if not k.startswith(("_", "architectures",
                                                                     "transformers_version"))}
        config.update(hidden_size=48, intermediate_size=96, num_attention_heads=3)
        CLIPTextModelWithProjection(CLIPTextConfig(**config)).save_pretrained(
            folder / "text_encoder_2")
        unet_config = {k: v for k, v in unet.items() if not k.startswith("_")}
        unet_config["cross_attention_dim"] = 32 + 48
        UNet2DConditionModel.from_config(unet_config).save_pretrained(folder / "unet")
    return folder


# --------------------------------------------------------------------------------- export
def test_export_writes_the_sdxl_layout(tiny, exported):
    tensors, meta = read(exported)
    prefixes = (ck.UNET_PREFIX, ck.VAE_PREFIX, ck.SDXL_CLIP_PREFIX, TE2)
    assert all(k.startswith(prefixes) for k in tensors)
    counts = {p: sum(k.startswith(p) for k in tensors) for p in prefixes}
    te2 = weights(tiny, "text_encoder_2")
    fused = sum(1 for k in te2 if "_proj." in k and "self_attn" in k and "out_proj" not in k)
    assert counts == {ck.UNET_PREFIX: len(weights(tiny, "unet")),
                      ck.VAE_PREFIX: len(weights(tiny, "vae")),
                      ck.SDXL_CLIP_PREFIX: len(weights(tiny, "text_encoder")) + 1,  # position_ids
                      TE2: len(te2) - fused + fused // 3 + 1}  # in_proj fused; logit_scale
    unet = weights(tiny, "unet")
    assert torch.equal(tensors[ck.UNET_PREFIX + "label_emb.0.0.weight"],
                       unet["add_embedding.linear_1.weight"])
    assert torch.equal(tensors[ck.UNET_PREFIX + "label_emb.0.2.bias"],
                       unet["add_embedding.linear_2.bias"])
    # No attention at the top level; the upsampler of a level with attention is .2.
    assert not any(k.startswith(ck.UNET_PREFIX + f"input_blocks.{n}.1.") for k in tensors
                   for n in (1, 2))
    assert ck.UNET_PREFIX + "output_blocks.2.2.conv.weight" in tensors
    assert ck.UNET_PREFIX + "input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight" in tensors
    # OpenCLIP's layout: every block kept, q/k/v fused, the projection transposed.
    blocks = {int(k.split(".")[6]) for k in tensors if k.startswith(TE2 + "transformer.resblocks.")}
    assert blocks == {0, 1}
    assert torch.equal(tensors[TE2 + "transformer.resblocks.1.attn.in_proj_weight"],
                       torch.cat([te2[f"encoder.layers.1.self_attn.{p}_proj.weight"]
                                  for p in "qkv"]))
    assert torch.equal(tensors[TE2 + "text_projection"], te2["text_projection.weight"].T)
    assert torch.equal(tensors[TE2 + "positional_embedding"],
                       te2["embeddings.position_embedding.weight"])
    assert torch.equal(tensors[ck.SDXL_CLIP_PREFIX + "embeddings.position_ids"],
                       torch.arange(77)[None])
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert file_family(exported) == SDXL


def test_metadata_names_sdxl_and_the_trained_resolution(tiny, work):
    model = work / "trained" / "model"
    shutil.copytree(tiny, model)
    (model / "params.json").write_text(json.dumps({"resolution": 1024}))
    (model / "training_info.json").write_text(json.dumps({"base_model": "tiny-sdxl", "steps": 3}))
    report = export_single_file(model, work / "trained.safetensors", progress=False)
    assert report.version == "sdxl" and "SDXL" in str(report)
    meta = read(report.path)[1]
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.resolution"] == "1024x1024"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["colab_dreambooth.base_model"] == "tiny-sdxl"
    assert meta["colab_dreambooth.steps"] == "3"
    stored = json.loads(meta["colab_dreambooth.text_encoder_2_config"])
    assert stored["architectures"] == ["CLIPTextModelWithProjection"]
    assert json.loads(meta["colab_dreambooth.vae_config"])["scaling_factor"] == 0.13025


def test_diffusers_converters_read_the_export_exactly(tiny, exported):
    """diffusers' own LDM->diffusers functions (offline, no config download) map our file back
    onto every weight of the original model, bit for bit."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    state = read(exported)[0]
    configs = {p: json.loads((tiny / p / "config.json").read_text()) for p in PARTS}
    te2_model = meta_model("text_encoder_2", configs["text_encoder_2"])
    converted = {
        "unet": convert_ldm_unet_checkpoint(state, configs["unet"]),
        "vae": convert_ldm_vae_checkpoint(state, configs["vae"]),
        "text_encoder": convert_ldm_clip_checkpoint(state),
        "text_encoder_2": convert_open_clip_checkpoint(te2_model, state, prefix=TE2),
    }
    for part in PARTS:
        got = {ck.strip_text_model(k): v for k, v in converted[part].items()
               if not k.endswith("position_ids")}
        want = weights(tiny, part)
        assert got.keys() == want.keys(), part
        assert all(torch.equal(got[k].reshape(want[k].shape), want[k]) for k in want), part


def test_diffusers_single_file_loader_reads_the_export(tiny, work):
    from diffusers import StableDiffusionXLPipeline

    wide = build_wide_sdxl(work / "wide", tiny)
    path = export_single_file(wide, work / "wide.safetensors", progress=False).path
    loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(wide),
                                                        local_files_only=True)
    original = StableDiffusionXLPipeline.from_pretrained(str(wide))
    for part in PARTS:
        a, b = getattr(original, part).state_dict(), getattr(loaded, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


# --------------------------------------------------------------------------- Create Model
def test_export_then_convert_is_exact_and_runs(tiny, converted):
    from diffusers import StableDiffusionXLPipeline

    for part in PARTS:
        a, b = weights(tiny, part), weights(converted, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
        assert all(b[k].dtype == torch.float32 for k in b), part
    index = json.loads((converted / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert sorted(p.name for p in converted.iterdir() if p.is_dir()) == sorted(
        PARTS + ("scheduler", "tokenizer", "tokenizer_2"))
    assert folder_family(converted) == SDXL
    back = StableDiffusionXLPipeline.from_pretrained(str(converted))
    assert type(back.scheduler).__name__ == "EulerDiscreteScheduler"
    assert back.tokenizer_2.pad_token == "!"
    original = StableDiffusionXLPipeline.from_pretrained(str(tiny))
    assert (generate(back) == generate(original)).all()


def test_file_without_metadata_gets_configs_from_shapes(tiny, exported, work):
    """A file as other tools write it (no configs stored): configs from the shipped SDXL ones
    plus what the shapes say; it loads and runs."""
    from diffusers import StableDiffusionXLPipeline

    bare = work / "bare.safetensors"
    save_file(read(exported)[0], bare)
    report = convert_single_file(bare, work / "bare", progress=False)
    assert (report.version, report.prediction_type) == ("sdxl", "epsilon")
    assert report.prediction_source == "SDXL default"
    assert report.configs_from == "shipped configs + weight shapes"
    unet = json.loads((work / "bare/unet/config.json").read_text())
    want = json.loads((tiny / "unet/config.json").read_text())
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "cross_attention_dim", "transformer_layers_per_block", "use_linear_projection",
                "addition_embed_type", "addition_time_embed_dim",
                "projection_class_embeddings_input_dim", "in_channels"):
        assert unet[key] == want[key], key
    te2 = json.loads((work / "bare/text_encoder_2/config.json").read_text())
    assert (te2["num_hidden_layers"], te2["hidden_size"], te2["projection_dim"]) == (2, 32, 32)
    assert json.loads((work / "bare/vae/config.json").read_text())["scaling_factor"] == 0.13025
    for part in PARTS:
        a, b = weights(tiny, part), weights(work / "bare", part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    pipe = StableDiffusionXLPipeline.from_pretrained(str(work / "bare"))
    assert generate(pipe).shape == (1, 64, 64, 3)


class _ShapesOnly(TensorFile):
    """A single file of which only the names and shapes exist (planning never reads a tensor)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.path = Path("sd_xl_base_1.0.safetensors")
        self.shapes = shapes
        self.metadata = {}

    def get(self, key: str) -> torch.Tensor:
        raise AssertionError(f"read {key}")


def full_size_ldm() -> dict[str, torch.Tensor]:
    """The weights of a full-size SDXL base under our LDM names, on the meta device."""
    configs = load_model_config("sdxl")
    ldm = {}
    for part in PARTS:
        state = meta_model(part, configs[part]).state_dict()
        links = (ck.unet_links(state, configs[part]) if part == "unet" else
                 ck.vae_links(state, configs[part]) if part == "vae" else
                 ck.clip_links(state, prefix=ck.SDXL_CLIP_PREFIX) if part == "text_encoder" else
                 ck.open_clip_links(state, prefix=TE2))
        for link in links:
            tensors = [state[k] for k in link.diffusers]
            tensor = torch.cat(tensors) if link.fused else tensors[0]
            tensor = tensor.T if link.transpose else tensor
            ldm[link.ldm] = tensor.reshape(*tensor.shape, 1, 1) if link.conv1x1 else tensor
    return ldm


def test_full_size_names_match_sdxl_and_diffusers_converters():
    """Our names for SDXL base 1.0 are the published ones, diffusers' converters map them onto
    every diffusers weight, and Create Model plans the full-size file back to the shipped
    configs (all on the meta device: no weights exist)."""
    from diffusers.loaders.single_file_utils import (
        CHECKPOINT_KEY_NAMES,
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )

    ldm = full_size_ldm()
    known = {  # names and shapes of sd_xl_base_1.0.safetensors
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight": (640, 640),
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight":
            (1280, 2048),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
        "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight":
            (768, 3072),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
        "conditioner.embedders.1.model.ln_final.bias": (1280,),
    }
    for name, shape in known.items():
        assert tuple(ldm[name].shape) == shape, name
    assert not any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in ldm)
    assert CHECKPOINT_KEY_NAMES["xl_base"] in ldm
    assert infer_diffusers_model_type(ldm) == "xl_base"

    configs = load_model_config("sdxl")
    te2 = meta_model("text_encoder_2", configs["text_encoder_2"])
    converted = {
        "unet": convert_ldm_unet_checkpoint(ldm, configs["unet"]),
        "vae": convert_ldm_vae_checkpoint(ldm, configs["vae"]),
        "text_encoder": convert_ldm_clip_checkpoint(ldm),
        "text_encoder_2": convert_open_clip_checkpoint(te2, ldm, prefix=TE2),
    }
    for part in PARTS:
        want = {ck.strip_text_model(k): v for k, v in
                meta_model(part, configs[part]).state_dict().items()}
        got = {ck.strip_text_model(k): v for k, v in converted[part].items()
               if not k.endswith("position_ids")}
        assert got.keys() == want.keys(), part
        assert all(got[k].shape == want[k].shape for k in want), part

    # Create Model's plan of the full-size file: SDXL, the shipped configs, no tensor read.
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    shapes[TE2 + "logit_scale"] = ()
    shapes[ck.SDXL_CLIP_PREFIX + "embeddings.position_ids"] = (1, 77)
    report, parts, planned = convert_module._plan(_ShapesOnly(shapes), v_prediction=None,
                                                  ema=False)
    assert report.version == "sdxl" and report.ignored_keys == 2
    for part in PARTS:
        shipped = configs[part]
        assert {k: planned[part][k] for k in shipped} == shipped, part
    assert sum(len(p.specs) for p in parts) == sum(
        len(meta_model(p, configs[p]).state_dict()) for p in PARTS)


# ------------------------------------------------------------------ fp16, EMA, refusals
def test_fp16_export_round_trips_within_rounding(tiny, work):
    path = export_single_file(tiny, work / "half.safetensors", fp16=True, progress=False).path
    tensors, meta = read(path)
    assert meta["colab_dreambooth.dtype"] == "fp16"
    assert {t.dtype for k, t in tensors.items() if "position_ids" not in k} == {torch.float16}
    convert_single_file(path, work / "half", progress=False)
    for part in PARTS:
        a, b = weights(tiny, part), weights(work / "half", part)
        assert all(torch.equal(a[k].half().float(), b[k]) for k in a), part
    convert_single_file(path, work / "half16", fp16=True, progress=False)
    assert {t.dtype for t in weights(work / "half16", "text_encoder_2").values()} == {
        torch.float16}


def test_ema_weights_export_and_import(tiny, exported, work):
    model = work / "ema-model"
    shutil.copytree(tiny, model)
    shutil.copytree(model / "unet", model / "unet_ema")
    file = next((model / "unet_ema").glob("*.safetensors"))
    save_file({k: v + 1 for k, v in load_file(file).items()}, file, metadata={"format": "pt"})
    path = export_single_file(model, work / "ema.safetensors", ema=True, progress=False).path
    tensors, meta = read(path)
    plain = read(exported)[0]
    assert meta["colab_dreambooth.unet_weights"] == "ema"
    key = ck.UNET_PREFIX + "label_emb.0.0.weight"
    assert torch.equal(tensors[key], plain[key] + 1)
    assert torch.equal(tensors[TE2 + "text_projection"], plain[TE2 + "text_projection"])
    # A training checkpoint holding both: the EMA copy is taken on request.
    both = dict(plain)
    both.update({ck.ema_name(k): v + 2 for k, v in plain.items() if k.startswith(ck.UNET_PREFIX)})
    save_file(both, work / "both.safetensors")
    report = convert_single_file(work / "both.safetensors", work / "both", ema=True,
                                 progress=False)
    assert report.ema and report.version == "sdxl"
    a, b = weights(tiny, "unet"), weights(work / "both", "unet")
    assert all(torch.equal(a[k] + 2, b[k]) for k in a)


def test_refiner_and_inpainting_models_are_refused(exported, work):
    state = read(exported)[0]
    refiner = {k.replace(TE2, ck.SDXL_REFINER_OPEN_CLIP_PREFIX): v for k, v in state.items()
               if not k.startswith(ck.SDXL_CLIP_PREFIX)}
    save_file(refiner, work / "refiner.safetensors")
    with pytest.raises(ModelFileError, match=r"refiner\.safetensors is an SDXL refiner"):
        convert_single_file(work / "refiner.safetensors", work / "out", progress=False)
    inpaint = dict(state)
    key = ck.UNET_PREFIX + "input_blocks.0.0.weight"
    inpaint[key] = torch.zeros(inpaint[key].shape[0], 9, *inpaint[key].shape[2:])
    save_file(inpaint, work / "inpaint.safetensors")
    with pytest.raises(ModelFileError, match="9 input channels, an inpainting model"):
        convert_single_file(work / "inpaint.safetensors", work / "out", progress=False)
    no_clip = {k: v for k, v in state.items() if not k.startswith(ck.SDXL_CLIP_PREFIX)}
    save_file(no_clip, work / "noclip.safetensors")
    with pytest.raises(ModelFileError, match="no first text encoder"):
        convert_single_file(work / "noclip.safetensors", work / "out", progress=False)
    holes = {k: v for k, v in state.items() if "resblocks.1.attn.in_proj_bias" not in k}
    save_file(holes, work / "holes.safetensors")
    with pytest.raises(ModelFileError, match=r"missing 1 weight\(s\) of a Stable Diffusion XL"):
        convert_single_file(work / "holes.safetensors", work / "out", progress=False)
    assert not (work / "out").exists()


def test_shipped_sdxl_configs_make_an_sdxl_folder(work):
    sdxl = load_model_config("sdxl")
    assert sdxl["unet"]["cross_attention_dim"] == 2048 == (
        sdxl["text_encoder"]["hidden_size"] + sdxl["text_encoder_2"]["hidden_size"])
    assert sdxl["unet"]["projection_class_embeddings_input_dim"] == (
        sdxl["text_encoder_2"]["projection_dim"] + 6 * sdxl["unet"]["addition_time_embed_dim"])
    assert sdxl["text_encoder_2"]["num_hidden_layers"] == 32
    assert (sdxl["vae"]["scaling_factor"], sdxl["vae"]["force_upcast"]) == (0.13025, True)
    assert sdxl["tokenizer_2"]["pad_token"] == "!"
    assert sdxl["scheduler"]["_class_name"] == "EulerDiscreteScheduler"
    folder = write_config_folder(sdxl, work / "configs")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert "safety_checker" not in index
    te2 = json.loads((folder / "text_encoder_2/config.json").read_text())
    assert te2["architectures"] == ["CLIPTextModelWithProjection"]


# ---------------------------------------------------------------------- dehydrate/rehydrate
def test_dehydrate_rehydrate_round_trip(tiny, work):
    trained = work / "dehydrate-model"
    shutil.copytree(tiny, trained)
    g = torch.Generator().manual_seed(0)
    for part, name in (("unet", "diffusion_pytorch_model.safetensors"),
                       ("text_encoder_2", "model.safetensors")):
        tensors = load_file(trained / part / name)
        tensors = {k: v + torch.randn(v.shape, generator=g) * 1e-2 if v.is_floating_point()
                   else v for k, v in tensors.items()}
        save_file(tensors, trained / part / name, metadata={"format": "pt"})
    result = dehydrate(trained, "tiny-sdxl", work / "dry.safetensors", progress=False)
    assert result.path.stat().st_size < sum(
        p.stat().st_size for p in trained.rglob("*.safetensors")) * 0.9
    out = rehydrate(result.path, "tiny-sdxl", work / "wet", progress=False)
    assert_bit_identical(trained, work / "wet")
    assert out is not None
    # The base's fingerprint covers SDXL's second text encoder.
    other = work / "other-base"
    shutil.copytree(tiny, other)
    file = other / "text_encoder_2" / "model.safetensors"
    tensors = load_file(file)
    first = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[first] = tensors[first] + 1
    save_file(tensors, file, metadata={"format": "pt"})
    assert base_fingerprint(other) != base_fingerprint("tiny-sdxl") == base_fingerprint(tiny)


def test_ckpt_export_and_cli_create_model(tiny, exported, work, capsys):
    from colab_dreambooth import cli

    ckpt = export_single_file(tiny, work / "tiny-sdxl.ckpt", progress=False).path
    loaded = torch.load(ckpt, map_location="cpu", weights_only=True)
    tensors = read(exported)[0]
    assert loaded["state_dict"].keys() == tensors.keys()
    assert all(torch.equal(loaded["state_dict"][k], tensors[k]) for k in tensors)
    parser = cli.build_parser()
    args = parser.parse_args(["create-model", str(ckpt), str(work / "from-ckpt")])
    assert args.run(args) == 0
    assert "Created Stable Diffusion XL (epsilon" in capsys.readouterr().out
    for part in PARTS:
        a, b = weights(tiny, part), weights(work / "from-ckpt", part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_projection_saved_as_a_linear_weight_is_read_as_is(tiny, exported, work):
    """Some tools save SDXL's projection as ``text_projection.weight`` (a linear layer's
    weight, diffusers' orientation) instead of OpenCLIP's transposed matrix."""
    state = read(exported)[0]
    state[TE2 + "text_projection.weight"] = state.pop(TE2 + "text_projection").T.contiguous()
    save_file(state, work / "linear.safetensors")
    convert_single_file(work / "linear.safetensors", work / "linear", progress=False)
    a, b = weights(tiny, "text_encoder_2"), weights(work / "linear", "text_encoder_2")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_sdxl_file_is_a_base_model(tiny, work):
    """A single SDXL file given as the base model is converted once and loads as SDXL."""
    path = export_single_file(tiny, work / "base" / "my-sdxl.safetensors", progress=False).path
    assert detect_family(str(path)) == SDXL
    components = load_components(str(path))
    assert components.family == SDXL and components.tokenizer_2.pad_token == "!"
    assert Path(components.source) == work / "base" / "my-sdxl-diffusers"
    assert torch.equal(components.unet.state_dict()["add_embedding.linear_1.weight"],
                       weights(tiny, "unet")["add_embedding.linear_1.weight"])
