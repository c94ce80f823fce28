"""Dehydrate / rehydrate on the tiny model: lossless bit-exactness, low-rank error, refusals."""

from __future__ import annotations

import filecmp
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from colab_dreambooth.config.params import save_params
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.models.loading import load_components
from colab_dreambooth.models.single_file.base_weights import base_fingerprint
from colab_dreambooth.models.single_file.dehydrate import dehydrate
from colab_dreambooth.models.single_file.dehydrated_file import (
    DehydrateError,
    PayloadWriter,
    read_info,
)
from colab_dreambooth.models.single_file.rehydrate import rehydrate
from colab_dreambooth.models.tiny import tiny_model_path

WEIGHTS = "diffusion_pytorch_model.safetensors"
CHANGED_TOKENS = (5, 400)  # the only token-embedding rows "training" touches


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dehydrate")


@pytest.fixture(scope="module")
def trained(work) -> Path:
    """The tiny model as ``train`` saves it after fine-tuning UNet and text encoder, with EMA."""
    return make_trained(work / "trained")


@pytest.fixture(scope="module")
def lossless(trained, work):
    return dehydrate(trained, "tiny", work / "lossless.safetensors", progress=False)


def make_trained(target: Path, *, dtype: torch.dtype | None = None, base: Path | None = None,
                 seed: int = 0) -> Path:
    """A copy of ``base`` (default: tiny) with UNet, EMA UNet and text encoder changed as
    training changes them: a low-rank-plus-noise change of every matrix, some tensors left
    alone, two token-embedding rows. ``dtype`` saves every weights file in that dtype."""
    base = base or tiny_model_path()
    shutil.copytree(base, target)
    g = torch.Generator().manual_seed(seed)
    unet = _perturb(load_file(target / "unet" / WEIGHTS), g, 1e-2, skip="time_embedding")
    ema = _perturb(unet, g, 1e-3, skip="time_embedding")
    text = _perturb(load_file(target / "text_encoder" / "model.safetensors"), g, 1e-2,
                    skip="token_embedding")
    embedding = next(k for k in text if "token_embedding" in k)
    for row in CHANGED_TOKENS:
        text[embedding][row] += torch.randn(text[embedding].shape[1], generator=g) * 1e-2
    (target / "unet_ema").mkdir()
    shutil.copy(target / "unet" / "config.json", target / "unet_ema" / "config.json")
    parts = {"unet": unet, "unet_ema": ema, "text_encoder": text,
             "vae": load_file(target / "vae" / WEIGHTS)}
    for sub, tensors in parts.items():
        if dtype is not None:
            tensors = {k: v.to(dtype) for k, v in tensors.items()}
        name = "model.safetensors" if sub == "text_encoder" else WEIGHTS
        save_file(tensors, target / sub / name, metadata={"format": "pt"})
    save_params(DreamBoothConfig(model_name="toy"), target / "params.json")
    (target / "training_info.json").write_text(json.dumps({"base_model": "tiny", "steps": 6}))
    return target


def _perturb(tensors: dict, g: torch.Generator, scale: float, skip: str) -> dict:
    out = {}
    for name, t in tensors.items():
        if skip in name or not t.is_floating_point():
            out[name] = t.clone()
            continue
        m = t.shape[0] if t.ndim else 1
        n = t.numel() // m
        change = (torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g)) * scale \
            + torch.randn(m, n, generator=g) * scale * 0.2
        out[name] = t + change.reshape(t.shape)
    return out


def weight_files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*.safetensors"))


def all_files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def assert_bit_identical(a: Path, b: Path) -> None:
    """Same files; every tensor equal bit for bit in its dtype; every file byte-identical."""
    assert all_files(a) == all_files(b)
    for rel in weight_files(a):
        ta, tb = load_file(a / rel), load_file(b / rel)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert ta[key].dtype == tb[key].dtype and ta[key].shape == tb[key].shape
            bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
            view = bits[ta[key].element_size()]
            assert torch.equal(ta[key].view(view), tb[key].view(view)), f"{rel} {key}"
    for rel in all_files(a):
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel


def stored_keys(file: Path) -> list[str]:
    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


# ----------------------------------------------------------------------------- lossless
def test_lossless_round_trip_is_bit_identical_and_loads(trained, lossless, work):
    result = lossless
    assert result.mode == "lossless" and result.rank is None
    assert result.errors["overall"] == 0.0
    assert result.file_bytes < result.model_bytes
    assert result.path.stat().st_size == result.file_bytes

    out = work / "rebuilt"
    rebuilt = rehydrate(result.path, "tiny", out, progress=False)
    assert rebuilt.verified and rebuilt.path == out
    assert_bit_identical(trained, out)

    parts = load_components(str(out))
    assert torch.equal(parts.unet.conv_in.weight,
                       load_file(trained / "unet" / WEIGHTS)["conv_in.weight"])
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"


def test_unchanged_parts_cost_nothing(trained, lossless):
    # The VAE was frozen: nothing of it is stored (only its file's header, among "other files").
    assert lossless.stored_bytes["vae"] == 0
    keys = stored_keys(lossless.path)
    assert not [k for k in keys if k.startswith("vae/")]
    info = read_info(lossless.path)
    kinds = {w["path"]: w["kinds"] for w in info.weights}
    assert kinds["vae/" + WEIGHTS] == {}
    # Untouched UNet tensors are not stored; two changed embedding rows are stored sparsely.
    assert not [k for k in kinds["unet/" + WEIGHTS] if "time_embedding" in k]
    text_kinds = kinds["text_encoder/model.safetensors"]
    embedding = next(k for k in text_kinds if "token_embedding" in k)
    assert text_kinds[embedding] == "sparse"
    width = load_file(trained / "text_encoder" / "model.safetensors")[embedding].shape[1]
    assert lossless.stored_bytes["text_encoder"] < 200_000  # not the 6.3 MB embedding
    sparse_index = [k for k in keys if embedding in k and k.endswith("::index")]
    with safe_open(str(lossless.path), framework="pt") as f:
        assert f.get_tensor(sparse_index[0]).numel() == len(CHANGED_TOKENS) * width


def test_base_itself_dehydrates_to_its_files_only(work):
    result = dehydrate(tiny_model_path(), "tiny", work / "nothing.safetensors", progress=False)
    assert set(result.stored_bytes.values()) == {0}
    assert result.file_bytes < result.files_bytes + 200_000  # the files and a header, no weights
    rehydrate(result.path, "tiny", work / "nothing", progress=False)
    assert_bit_identical(tiny_model_path(), work / "nothing")


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.float16])
def test_fp16_model_round_trip_is_bit_identical(work, base_dtype):
    base = work / f"base-{base_dtype}"
    if base_dtype == torch.float32:
        base = tiny_model_path()
    else:
        shutil.copytree(tiny_model_path(), base)
        for path in base.rglob("*.safetensors"):
            save_file({k: v.half() for k, v in load_file(path).items()}, path,
                      metadata={"format": "pt"})
    model = make_trained(work / f"fp16-over-{base_dtype}", dtype=torch.float16, base=base)
    # Values whose difference from the base does not survive fp16 rounding, and a tensor whose
    # change an fp16 subtraction undoes exactly.
    unet = load_file(model / "unet" / WEIGHTS)
    unet["conv_in.weight"].view(-1)[:8] = torch.tensor(1e-7, dtype=torch.float16)
    base_norm = load_file(base / "unet" / WEIGHTS)["conv_norm_out.weight"].half()
    unet["conv_norm_out.weight"] = base_norm + 2.0 ** -6
    save_file(unet, model / "unet" / WEIGHTS, metadata={"format": "pt"})

    file = work / f"fp16-{base_dtype}.safetensors"
    result = dehydrate(model, str(base), file, progress=False)
    unet_kinds = next(w["kinds"] for w in read_info(file).weights if w["path"].startswith("unet/"))
    assert unet_kinds["conv_in.weight"] == "full"
    assert unet_kinds["conv_norm_out.weight"] == "delta"
    assert result.stored_bytes["vae"] == 0  # fp16 VAE == the base's VAE cast to fp16
    rehydrate(file, str(base), work / f"fp16-rebuilt-{base_dtype}", progress=False)
    assert_bit_identical(model, work / f"fp16-rebuilt-{base_dtype}")


# ----------------------------------------------------------------------------- low rank
def test_lowrank_error_is_reported_and_falls_with_rank(trained, lossless, work):
    results = {rank: dehydrate(trained, "tiny", work / f"rank{rank}.safetensors", rank=rank,
                               progress=False)
               for rank in (1, 4, 16, 10_000)}
    errors = [results[r].errors["overall"] for r in (1, 4, 16, 10_000)]
    sizes = [results[r].file_bytes for r in (1, 4, 16, 10_000)]
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert sizes[0] < sizes[1] < sizes[2]
    assert errors[3] < 1e-3  # full rank: only the fp16 rounding of the factors is lost
    assert results[1].errors["overall"] > 0.3
    assert set(results[4].errors) == {"unet", "unet_ema", "text_encoder", "vae", "overall"}
    assert results[4].errors["vae"] == 0.0
    assert results[4].file_bytes < 0.2 * lossless.file_bytes
    assert "error" in results[4].summary() and "%" in results[4].summary()
    assert read_info(results[4].path).errors == results[4].errors

    info = read_info(results[4].path)
    for record in info.weights:
        shapes = {k: v.shape for k, v in load_file(trained / record["path"]).items()}
        for name, kind in record["kinds"].items():
            if kind == "lowrank":
                assert len(shapes[name]) >= 2  # biases and norms stay exact

    # The rebuilt model is what the reported error describes, and it loads.
    out = work / "rank4"
    rebuilt = rehydrate(results[4].path, "tiny", out, progress=False)
    assert not rebuilt.verified
    load_components(str(out))
    t = load_file(trained / "unet" / WEIGHTS)
    r = load_file(out / "unet" / WEIGHTS)
    b = load_file(tiny_model_path() / "unet" / WEIGHTS)
    lost = sum(float((t[k].double() - r[k].double()).square().sum()) for k in t)
    change = sum(float((t[k].double() - b[k].double()).square().sum()) for k in t)
    assert math.sqrt(lost / change) == pytest.approx(results[4].errors["unet"], rel=1e-3)


# ----------------------------------------------------------------------------- refusals
def test_rehydrating_onto_another_base_is_refused(lossless, work):
    other = work / "other-base"
    shutil.copytree(tiny_model_path(), other)
    vae = load_file(other / "vae" / WEIGHTS)
    vae["decoder.conv_out.bias"][0] += 1e-3  # one value of one tensor
    save_file(vae, other / "vae" / WEIGHTS, metadata={"format": "pt"})
    theirs = base_fingerprint(other)
    assert theirs != lossless.base_fingerprint
    with pytest.raises(DehydrateError) as err:
        rehydrate(lossless.path, other, work / "wrong", progress=False)
    assert lossless.base_fingerprint in str(err.value) and theirs in str(err.value)
    assert "exact base model" in str(err.value)
    assert not (work / "wrong").exists()


def test_fingerprint_ignores_how_the_base_is_split_into_files(trained, lossless, work):
    sharded = work / "sharded-base"
    shutil.copytree(tiny_model_path(), sharded)
    unet = load_file(sharded / "unet" / WEIGHTS)
    (sharded / "unet" / WEIGHTS).unlink()
    names = sorted(unet)
    index = {}
    for i, chunk in enumerate((names[::2], names[1::2])):
        shard = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: unet[k] for k in chunk}, sharded / "unet" / shard)
        index.update({k: shard for k in chunk})
    (sharded / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": index}))
    assert base_fingerprint(sharded) == base_fingerprint("tiny")
    rehydrate(lossless.path, sharded, work / "from-sharded", progress=False)
    assert_bit_identical(trained, work / "from-sharded")


def test_damaged_files_give_clear_errors(lossless, work):
    data = lossless.path.read_bytes()
    truncated = work / "truncated.safetensors"
    truncated.write_bytes(data[:-1000])
    with pytest.raises(DehydrateError, match="truncated or corrupt"):
        rehydrate(truncated, "tiny", work / "t-out", progress=False)

    flipped = work / "flipped.safetensors"
    damaged = bytearray(data)
    damaged[-5000] ^= 0xFF
    flipped.write_bytes(bytes(damaged))
    with pytest.raises(DehydrateError, match="corrupt"):
        rehydrate(flipped, "tiny", work / "f-out", progress=False)

    with pytest.raises(DehydrateError, match="not a dehydrated model"):
        read_info(tiny_model_path() / "unet" / WEIGHTS)
    (work / "junk.safetensors").write_text("not a model")
    with pytest.raises(DehydrateError, match="truncated or corrupt"):
        read_info(work / "junk.safetensors")
    with pytest.raises(DehydrateError, match="not found"):
        read_info(work / "missing.safetensors")
    assert not any((work / n).exists() for n in ("t-out", "f-out"))


def test_inputs_and_existing_outputs_are_never_overwritten(trained, lossless, work):
    with pytest.raises(DehydrateError, match="already exists"):
        dehydrate(trained, "tiny", lossless.path, progress=False)
    with pytest.raises(DehydrateError, match="inside the trained model"):
        dehydrate(trained, "tiny", trained / "d.safetensors", progress=False)
    with pytest.raises(DehydrateError, match="overlaps the base"):
        rehydrate(lossless.path, "tiny", tiny_model_path(), progress=False)
    busy = work / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    with pytest.raises(DehydrateError, match="not empty"):
        rehydrate(lossless.path, "tiny", busy, progress=False)
    assert (busy / "keep.txt").read_text() == "user data"
    with pytest.raises(DehydrateError, match="rank"):
        dehydrate(trained, "tiny", work / "r0.safetensors", rank=0, progress=False)
    with pytest.raises(DehydrateError, match="not a diffusers folder"):
        dehydrate(work, "tiny", work / "x.safetensors", progress=False)
    assert not list(work.glob(".*.tmp-*"))  # no temp file left behind


def test_a_token_in_a_carried_file_is_refused(trained, work):
    model = work / "with-token"
    shutil.copytree(trained, model)
    token = "hf_" + "Ab1" * 12
    (model / "training_info.json").write_text(json.dumps({"hub_token": token}))
    with pytest.raises(DehydrateError, match="token") as err:
        dehydrate(model, "tiny", work / "token.safetensors", progress=False)
    assert token not in str(err.value)
    assert not (work / "token.safetensors").exists()


def test_pickle_weights_are_refused(trained, work):
    model = work / "with-bin"
    shutil.copytree(trained, model)
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(DehydrateError, match=r"\.bin"):
        dehydrate(model, "tiny", work / "bin.safetensors", progress=False)


# ----------------------------------------------------------------------------- pieces
def test_streaming_writer_moves_the_data_when_the_header_outgrows_its_room(tmp_path):
    tensors = {f"t{i}": torch.randn(3, i + 1) for i in range(20)}
    tensors["half"] = torch.randn(5).half()
    tensors["bytes"] = torch.arange(7, dtype=torch.uint8)
    for reserve in (8, 1 << 16):
        path = tmp_path / f"w{reserve}.safetensors"
        writer = PayloadWriter(path, reserve)
        for name, t in tensors.items():
            writer.add(name, t)
        writer.finish({"note": "x"})
        writer.close()
        loaded = load_file(path)
        assert loaded.keys() == tensors.keys()
        assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata()["note"] == "x" and len(f.metadata()["payload_sha256"]) == 64


def test_cli_dehydrate_and_rehydrate(trained, work, capsys):
    from colab_dreambooth import cli

    parser = cli.build_parser()

    # The model's working folder (holding model/) is accepted as well as the folder itself.
    working = work / "cli-models" / "dreambooth" / "toy"
    working.mkdir(parents=True)
    os.symlink(trained, working / "model")
    file = work / "cli.safetensors"
    args = parser.parse_args(["dehydrate", str(working), "tiny", str(file), "--rank", "4"])
    assert args.run(args) == 0
    shown = capsys.readouterr().out
    assert str(file) in shown and "rank 4" in shown and "MB" in shown
    assert "Reconstruction error overall" in shown and "unet" in shown

    args = parser.parse_args(["rehydrate", str(file), "tiny", str(work / "cli-out")])
    assert args.run(args) == 0
    assert "Rebuilt" in capsys.readouterr().out
    assert all_files(work / "cli-out") == all_files(trained)

    args = parser.parse_args(["dehydrate", str(trained), "tiny", str(file)])
    assert args.run(args) == 1
    assert "already exists" in capsys.readouterr().err
    args = parser.parse_args(["dehydrate", str(trained), "tiny", str(file), "--rank"])
    assert args.rank == 128


def test_cli_registers_through_the_main_parser(lossless, work, capsys):
    from colab_dreambooth import cli

    assert cli.main(["rehydrate", str(lossless.path), "tiny", str(work / "main-out")]) == 0
    assert "byte-identical" in capsys.readouterr().out
    assert cli.main(["rehydrate", str(work / "missing.safetensors"), "tiny",
                     str(work / "main-out2")]) == 1
    assert "not found" in capsys.readouterr().err
