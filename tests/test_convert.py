"""Create Model: single-file checkpoints (SD 1.x/2.x, .safetensors/.ckpt) become diffusers folders.

The inputs are real single files in the original layout, made from the tiny SD-shaped models
by the exporter (itself checked against diffusers' own loader in test_export.py), then edited
the way real-world files differ: no metadata, .ckpt wrappers, EMA copies, missing weights.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from colab_dreambooth import cli
from colab_dreambooth.errors import ModelLoadError
from colab_dreambooth.models.loading import load_components
from colab_dreambooth.models.single_file import ldm_keys as ck
from colab_dreambooth.models.single_file.convert import convert_single_file
from colab_dreambooth.models.single_file.export import export_single_file
from colab_dreambooth.models.single_file.model_configs import load_model_config
from colab_dreambooth.models.single_file.readers import ModelFileError, open_model_file
from colab_dreambooth.models.tiny import clip_tokenizer, tiny_model_path

PARTS = ("unet", "vae", "text_encoder")


def build_tiny_sd2(folder: Path, v_prediction: bool = True) -> Path:
    """A tiny SD 2.x-shaped pipeline: OpenCLIP-style text encoder (gelu, 3 layers), linear
    attention projections, per-block heads; random seeded weights."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer()
    tokenizer.pad_token = "!"
    with torch.random.fork_rng():
        torch.manual_seed(1)
        unet = UNet2DConditionModel(
            sample_size=8, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
            norm_num_groups=16, cross_attention_dim=48, attention_head_dim=(2, 2, 4, 4),
            use_linear_projection=True,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae = AutoencoderKL(
            layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=16, sample_size=32,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            hidden_size=48, intermediate_size=96, num_attention_heads=3, num_hidden_layers=3,
            hidden_act="gelu", vocab_size=len(tokenizer), max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="v_prediction" if v_prediction else "epsilon")
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return Path(folder)


def weights(folder: Path, part: str) -> dict[str, torch.Tensor]:
    """Every tensor of one part of a diffusers folder (all its shards)."""
    tensors = {}
    for file in sorted((Path(folder) / part).glob("*.safetensors")):
        tensors.update(load_file(file))
    return {ck.strip_text_model(k): v for k, v in tensors.items()}


def assert_same_weights(a: Path, b: Path, *, dtype: torch.dtype | None = None) -> None:
    for part in PARTS:
        wa, wb = weights(a, part), weights(b, part)
        assert wa.keys() == wb.keys(), part
        for key in wa:
            expected = wa[key] if dtype is None else wa[key].to(dtype)
            assert wb[key].dtype == expected.dtype, key
            assert torch.equal(wb[key], expected), f"{part}: {key}"


def assert_same_configs(a: Path, b: Path) -> None:
    for name in ("unet/config.json", "vae/config.json", "text_encoder/config.json",
                 "scheduler/scheduler_config.json"):
        ca = json.loads((a / name).read_text())
        cb = json.loads((b / name).read_text())
        ignore = {"_name_or_path", "transformers_version", "_diffusers_version"}
        assert {k: v for k, v in ca.items() if k not in ignore} == \
            {k: v for k, v in cb.items() if k not in ignore}, name


def strip_metadata(src: Path, dst: Path, **metadata: str) -> Path:
    """The same tensors without our exporter's header (as most files in the wild are)."""
    save_file(load_file(src), dst, metadata=metadata or None)
    return dst


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("convert")
    sd2 = build_tiny_sd2(root / "sd2-diffusers")
    out = {"sd1_dir": tiny_model_path(), "sd2_dir": sd2, "root": root}
    out["sd1"] = export_single_file(tiny_model_path(), root / "sd1.safetensors",
                                    progress=False).path
    out["sd2"] = export_single_file(sd2, root / "sd2.safetensors", progress=False).path
    out["sd1_bare"] = strip_metadata(out["sd1"], root / "sd1-bare.safetensors")
    out["sd2_bare"] = strip_metadata(out["sd2"], root / "sd2-bare.safetensors")
    return out


# ------------------------------------------------------------------------------- SD 1.x
def test_sd1_round_trip_is_exact_and_loads(files, tmp_path):
    from diffusers import StableDiffusionPipeline

    report = convert_single_file(files["sd1"], tmp_path / "out", progress=False)
    assert report.version == "sd1" and report.prediction_type == "epsilon"
    assert report.configs_from == "file metadata"
    assert_same_weights(files["sd1_dir"], tmp_path / "out")
    assert_same_configs(files["sd1_dir"], tmp_path / "out")
    parts = load_components(str(tmp_path / "out"))
    assert parts.tokenizer("a photo").input_ids == [49406, 320, 1125, 49407]
    assert parts.prediction_type == "epsilon"
    # Same weights and configs: the same model (images are compared in test_export.py).
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "out"), safety_checker=None)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"


def test_file_without_metadata_gets_configs_from_shapes(files, tmp_path):
    report = convert_single_file(files["sd1_bare"], tmp_path / "out", progress=False)
    assert report.configs_from == "shipped configs + weight shapes"
    assert_same_weights(files["sd1_dir"], tmp_path / "out")
    unet = json.loads((tmp_path / "out/unet/config.json").read_text())
    tiny = json.loads((files["sd1_dir"] / "unet/config.json").read_text())
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "cross_attention_dim", "in_channels", "out_channels", "attention_head_dim",
                "use_linear_projection"):
        assert unet[key] == tiny[key], key
    vae = json.loads((tmp_path / "out/vae/config.json").read_text())
    assert vae["block_out_channels"] == [16, 16, 32, 32] and vae["layers_per_block"] == 2
    assert vae["scaling_factor"] == 0.18215
    text = json.loads((tmp_path / "out/text_encoder/config.json").read_text())
    assert (text["hidden_size"], text["num_hidden_layers"], text["intermediate_size"]) == (32, 2, 64)
    assert text["hidden_act"] == "quick_gelu"
    load_components(str(tmp_path / "out"))


def test_ckpt_files_convert_like_safetensors(files, tmp_path):
    state = load_file(files["sd1_bare"])
    wrapped, bare, legacy = (tmp_path / f"{name}.ckpt" for name in ("wrapped", "bare", "legacy"))
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 3}, wrapped)
    torch.save(state, bare)
    # The pre-zip format of 2022 cannot be memory-mapped: read whole, still weights only.
    torch.save({"state_dict": state}, legacy, _use_new_zipfile_serialization=False)
    for path in (wrapped, bare, legacy):
        convert_single_file(path, tmp_path / path.stem, progress=False)
        assert_same_weights(files["sd1_dir"], tmp_path / path.stem)
    assert open_model_file(wrapped).global_step == 470000


def test_ckpt_with_lightning_training_state_loads_weights_only(files, tmp_path, monkeypatch):
    # Original CompVis checkpoints carry a pytorch_lightning ModelCheckpoint beside the weights.
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks",
                 "pytorch_lightning.callbacks.model_checkpoint"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_path = "/logs/last.ckpt"
            self.best_model_score = torch.tensor(0.1)

    ModelCheckpoint.__module__ = "pytorch_lightning.callbacks.model_checkpoint"
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    sys.modules[ModelCheckpoint.__module__].ModelCheckpoint = ModelCheckpoint
    path = tmp_path / "sd-v1-4.ckpt"
    torch.save({"state_dict": load_file(files["sd1_bare"]), "callbacks": {"cb": ModelCheckpoint()},
                "global_step": 470000}, path)
    monkeypatch.undo()  # the loader must not need the class
    convert_single_file(path, tmp_path / "out", progress=False)
    assert_same_weights(files["sd1_dir"], tmp_path / "out")


class Payload:
    """Any class outside torch's safe list: a pickle could run code through it."""


def test_ckpt_with_other_python_objects_is_refused(files, tmp_path):
    path = tmp_path / "odd.ckpt"
    torch.save({"state_dict": load_file(files["sd1_bare"]), "extra": Payload()}, path)
    with pytest.raises(ModelFileError, match=r"odd\.ckpt holds Python objects.*Payload"):
        convert_single_file(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_sharded_fp16_output(files, tmp_path):
    report = convert_single_file(files["sd1"], tmp_path / "out", fp16=True,
                                 max_shard_size=3_000_000, progress=False)
    assert report.dtype == "fp16"
    unet = tmp_path / "out/unet"
    index = json.loads((unet / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(unet.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) >= 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert all(s.stat().st_size < 3_000_000 + 200_000 for s in shards)
    assert_same_weights(files["sd1_dir"], tmp_path / "out", dtype=torch.float16)
    with safe_open(str(shards[0]), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    parts = load_components(str(tmp_path / "out"))
    assert parts.unet.conv_in.weight.shape[0] == 32


def test_ema_weights_are_taken_on_request(files, tmp_path):
    state = load_file(files["sd1_bare"])
    unet_keys = [k for k in state if k.startswith(ck.UNET_PREFIX)]
    for key in unet_keys:
        state[ck.ema_name(key)] = state[key] + 1
    path = save_file(state, tmp_path / "ema.safetensors") or tmp_path / "ema.safetensors"
    plain = convert_single_file(path, tmp_path / "plain", progress=False)
    assert not plain.ema and any("EMA" in note for note in plain.notes)
    assert_same_weights(files["sd1_dir"], tmp_path / "plain")
    ema = convert_single_file(path, tmp_path / "ema", ema=True, progress=False)
    assert ema.ema
    a, b = weights(files["sd1_dir"], "unet"), weights(tmp_path / "ema", "unet")
    assert all(torch.equal(a[k] + 1, b[k]) for k in a)


# ------------------------------------------------------------------------------- SD 2.x
def test_sd2_round_trip_is_exact(files, tmp_path):
    report = convert_single_file(files["sd2"], tmp_path / "out", progress=False)
    assert (report.version, report.prediction_type) == ("sd2", "v_prediction")
    assert_same_weights(files["sd2_dir"], tmp_path / "out")
    assert_same_configs(files["sd2_dir"], tmp_path / "out")
    parts = load_components(str(tmp_path / "out"))
    assert parts.prediction_type == "v_prediction"
    assert parts.tokenizer.pad_token == "!"
    assert parts.text_encoder.config.num_hidden_layers == 3  # the file holds 4 OpenCLIP blocks
    ids = parts.tokenizer(["a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    original = load_components(str(files["sd2_dir"]))
    with torch.no_grad():
        assert torch.equal(parts.text_encoder(ids)[0], original.text_encoder(ids)[0])


def test_sd2_without_metadata_follows_diffusers_rules(files, tmp_path):
    v = convert_single_file(files["sd2_bare"], tmp_path / "v", progress=False)
    assert (v.version, v.prediction_type) == ("sd2", "v_prediction")
    assert_same_weights(files["sd2_dir"], tmp_path / "v")
    unet = json.loads((tmp_path / "v/unet/config.json").read_text())
    assert unet["use_linear_projection"] and unet["cross_attention_dim"] == 48
    assert unet["sample_size"] == 96 and unet["upcast_attention"]  # SD 2.x 768 config
    assert unet["attention_head_dim"] == [1, 1, 1, 1]  # 64 channels a head, at least one
    scheduler = json.loads((tmp_path / "v/scheduler/scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler"
    text = json.loads((tmp_path / "v/text_encoder/config.json").read_text())
    assert (text["hidden_act"], text["num_hidden_layers"], text["hidden_size"]) == ("gelu", 3, 48)

    eps = convert_single_file(files["sd2_bare"], tmp_path / "eps", v_prediction=False,
                              progress=False)
    assert eps.prediction_type == "epsilon"
    unet = json.loads((tmp_path / "eps/unet/config.json").read_text())
    assert unet["sample_size"] == 64 and not unet["upcast_attention"]  # SD 2.x base config
    assert load_components(str(tmp_path / "eps")).prediction_type == "epsilon"


def test_prediction_type_clues(files, tmp_path):
    def predicted(path, **kwargs):
        return convert_single_file(path, tmp_path / f"out-{path.stem}", progress=False,
                                   **kwargs).prediction_type

    # SD 2.x base checkpoints are told apart by their global_step, as diffusers does.
    base = tmp_path / "v2-1_512.ckpt"
    torch.save({"state_dict": load_file(files["sd2_bare"]), "global_step": 875000}, base)
    assert predicted(base) == "epsilon"
    spec = strip_metadata(files["sd2"], tmp_path / "spec.safetensors",
                          **{"modelspec.prediction_type": "epsilon"})
    assert predicted(spec) == "epsilon"
    # AUTOMATIC1111's convention: a .yaml with the same name beside the checkpoint.
    sd1_v = shutil.copy(files["sd1_bare"], tmp_path / "anime-v.safetensors")
    (tmp_path / "anime-v.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert predicted(Path(sd1_v)) == "v_prediction"
    assert predicted(files["sd1_bare"], v_prediction=True) == "v_prediction"


# ------------------------------------------------------------------------------- errors
def test_damaged_files_are_clear_errors(files, tmp_path):
    truncated = tmp_path / "half.safetensors"
    data = files["sd1"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"half\.safetensors .*incomplete download"):
        convert_single_file(truncated, tmp_path / "out", progress=False)
    whole, cut = tmp_path / "whole.ckpt", tmp_path / "cut.ckpt"
    torch.save({"state_dict": load_file(files["sd1_bare"])}, whole)
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ModelFileError, match=r"cut\.ckpt could not be read .*truncated"):
        convert_single_file(cut, tmp_path / "out", progress=False)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(ModelFileError, match=r"garbage\.ckpt .*corrupt, truncated"):
        convert_single_file(garbage, tmp_path / "out", progress=False)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match=r"empty\.safetensors is empty"):
        convert_single_file(empty, tmp_path / "out", progress=False)
    with pytest.raises(ModelFileError, match="not found"):
        convert_single_file(tmp_path / "nope.ckpt", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert issubclass(ModelFileError, ModelLoadError)  # load_components callers catch it


def test_missing_weights_are_listed(files, tmp_path):
    state = load_file(files["sd1_bare"])
    gone = ["model.diffusion_model.out.2.weight", "first_stage_model.decoder.conv_out.bias",
            "cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    for key in gone:
        del state[key]
    save_file(state, tmp_path / "holes.safetensors")
    with pytest.raises(ModelFileError) as err:
        convert_single_file(tmp_path / "holes.safetensors", tmp_path / "out", progress=False)
    message = str(err.value)
    assert "holes.safetensors is missing 3 weight(s)" in message
    assert all(key in message for key in gone)


@pytest.mark.parametrize("keys, expected", [
    ({"lora_unet_down_blocks_0.lora_up.weight": (4, 4)}, "looks like a LoRA"),
    ({"down_blocks.0.resnets.0.conv1.weight": (4, 4)}, "single diffusers part"),
    ({"conditioner.embedders.0.transformer.text_model.x": (4,),
      "model.diffusion_model.input_blocks.0.0.weight": (4,)}, "SDXL"),
    ({"foo": (2,)}, "not a Stable Diffusion checkpoint"),
])
def test_other_kinds_of_files_are_named(tmp_path, keys, expected):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, path)
    with pytest.raises(ModelFileError, match=expected):
        convert_single_file(path, tmp_path / "out", progress=False)


def test_incomplete_parts_and_wrong_shapes(files, tmp_path):
    state = load_file(files["sd1_bare"])
    no_vae = {k: v for k, v in state.items() if not k.startswith(ck.VAE_PREFIX)}
    save_file(no_vae, tmp_path / "novae.safetensors")
    with pytest.raises(ModelFileError, match="no VAE weights"):
        convert_single_file(tmp_path / "novae.safetensors", tmp_path / "out", progress=False)
    state["model.diffusion_model.out.0.weight"] = torch.zeros(7)
    save_file(state, tmp_path / "shape.safetensors")
    with pytest.raises(ModelFileError, match=r"unexpected shapes.*out\.0\.weight is \[7\]"):
        convert_single_file(tmp_path / "shape.safetensors", tmp_path / "out", progress=False)


def test_output_folder_is_protected(files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ModelFileError, match="not empty"):
        convert_single_file(files["sd1"], out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    inside = shutil.copy(files["sd1"], out / "model.safetensors")
    with pytest.raises(ModelFileError, match="holds the checkpoint"):
        convert_single_file(inside, out, overwrite=True, progress=False)
    assert Path(inside).is_file()
    convert_single_file(files["sd1"], tmp_path / "again", progress=False)
    convert_single_file(files["sd1"], tmp_path / "again", overwrite=True, progress=False)
    assert (tmp_path / "again/model_index.json").is_file()
    assert not list(tmp_path.glob(".again*"))  # no temporary folders left behind


def test_shipped_configs_cover_the_three_models():
    sd1, sd2, sd2v = (load_model_config(v) for v in ("sd1", "sd2", "sd2-v"))
    assert sd1["unet"]["cross_attention_dim"] == 768 and sd1["text_encoder"]["hidden_size"] == 768
    assert sd2["unet"]["cross_attention_dim"] == 1024 == sd2["text_encoder"]["hidden_size"]
    assert sd2["text_encoder"]["num_hidden_layers"] == 23 and sd2["tokenizer"]["pad_token"] == "!"
    assert sd2["scheduler"]["prediction_type"] == "epsilon"
    assert sd2v["scheduler"]["prediction_type"] == "v_prediction" and sd2v["unet"]["sample_size"] == 96
    with pytest.raises(ValueError, match="sd1, sd2, sd2-v, sdxl"):
        load_model_config("sdxl-refiner")


# ---------------------------------------------------------------------------------- CLI
def test_cli_create_model(files, tmp_path, capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["create-model", str(files["sd2_bare"]), str(tmp_path / "out"),
                              "--epsilon", "--fp16"])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "Created Stable Diffusion 2.x (epsilon, as asked), fp16" in out
    assert (tmp_path / "out/model_index.json").is_file()
    args = parser.parse_args(["create-model", str(tmp_path / "missing.ckpt"), str(tmp_path / "x")])
    assert args.run(args) == 1
    assert "error: checkpoint file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["create-model", "a", "b", "--epsilon", "--v-prediction"])


def test_inpainting_models_are_refused(files, tmp_path):
    state = load_file(files["sd1_bare"])
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = torch.zeros(state[key].shape[0], 9, *state[key].shape[2:])
    save_file(state, tmp_path / "inpaint.safetensors")
    with pytest.raises(ModelFileError, match="9 input channels, an inpainting model"):
        convert_single_file(tmp_path / "inpaint.safetensors", tmp_path / "out", progress=False)
