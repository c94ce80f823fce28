"""SDXL training on the tiny SDXL model: the conditioning diffusers' SDXL pipeline makes, each
image's size/crop numbers, a LoRA run whose file diffusers loads back, a full fine-tune that
loads as an SDXL pipeline, sampling, and an exact resume after SIGKILL."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from run_helpers import train_whole_and_killed
from safetensors.torch import load_file

from colab_dreambooth.data.dataset import (
    DreamBoothDataset,
    Example,
    TrainingData,
    collate,
)
from colab_dreambooth.data.images import cover_and_crop
from colab_dreambooth.demo import demo_config
from colab_dreambooth.generation.sample import generate_samples
from colab_dreambooth.models import lora_file
from colab_dreambooth.models.families import SD, SDXL, detect_family
from colab_dreambooth.models.loading import load_components
from colab_dreambooth.models.lora_file import read_lora
from colab_dreambooth.models.pipelines import (
    load_lora_pipeline,
    load_pipeline,
    pipeline_text_encoder,
)
from colab_dreambooth.models.text_encoding import (
    DualTextEncoder,
    encode_token_ids,
    prompt_token_ids,
    text_parts,
)
from colab_dreambooth.models.tiny import tiny_sdxl_model_path
from colab_dreambooth.training import saving as saving_module
from colab_dreambooth.training.placement import vae_compute_dtype
from colab_dreambooth.training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a photo of zwx toy"


@pytest.fixture(scope="module")
def sdxl_parts():
    return load_components("tiny-sdxl")


def sdxl_pipeline():
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def outputs(unet, text_encoder, tokenizers) -> dict[str, torch.Tensor]:
    """Text states, pooled embedding and one UNet prediction (with size/crop numbers)."""
    ids = prompt_token_ids(tokenizers, [PROMPT])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    time_ids = torch.tensor([[64.0, 96.0, 0.0, 16.0, 64.0, 64.0]])
    with torch.no_grad():
        condition = encode_token_ids(text_encoder, ids)
        noise = unet(latents, 500, condition.states, **condition.unet_kwargs(time_ids)).sample
    return {"states": condition.states, "pooled": condition.pooled, "noise": noise}


def pipe_outputs(pipe) -> dict[str, torch.Tensor]:
    return outputs(pipe.unet, DualTextEncoder(pipe.text_encoder, pipe.text_encoder_2),
                   (pipe.tokenizer, pipe.tokenizer_2))


def capture_at_save(captured: dict):
    """A stand-in for save_lora_model that first records the trained model's
    :func:`outputs` into ``captured``."""
    original = saving_module.save_lora_model

    def spy(config, parts, unet, text_encoder, step, *rest):
        unet.eval()
        text_encoder.eval()
        captured.update(outputs(unet, text_encoder, parts.tokenizers))
        return original(config, parts, unet, text_encoder, step, *rest)

    return spy


# ----------------------------------------------------------------------------- the family
def test_family_is_read_from_the_model(sdxl_parts):
    assert detect_family("tiny-sdxl") == SDXL and detect_family("tiny") == SD
    assert detect_family(str(tiny_sdxl_model_path())) == SDXL
    assert sdxl_parts.family == SDXL and len(sdxl_parts.tokenizers) == 2
    assert isinstance(sdxl_parts.text_encoder, DualTextEncoder)
    assert set(text_parts(sdxl_parts.text_encoder)) == {"text_encoder", "text_encoder_2"}
    assert load_components("tiny").family == SD


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_conditioning_is_what_the_sdxl_pipeline_makes(sdxl_parts, clip_skip):
    """Both encoders' penultimate states side by side and the second's pooled projection, as
    diffusers' SDXL pipeline encodes a prompt; Clip Skip 2 is the pipeline's clip_skip=1."""
    pipe = sdxl_pipeline()
    expected, _, pooled, _ = pipe.encode_prompt(
        PROMPT, device="cpu", do_classifier_free_guidance=False,
        clip_skip=None if clip_skip == 1 else clip_skip - 1)
    with torch.no_grad():
        ours = encode_token_ids(sdxl_parts.text_encoder,
                                prompt_token_ids(sdxl_parts.tokenizers, [PROMPT]), clip_skip)
    torch.testing.assert_close(ours.states, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.pooled, pooled, rtol=1e-5, atol=1e-6)


def test_long_prompts_pool_their_first_chunk(sdxl_parts):
    long = ", ".join(["zwx toy on a red table"] * 20)  # > 75 tokens
    with torch.no_grad():
        ids = prompt_token_ids(sdxl_parts.tokenizers, [long, PROMPT], max_token_length=150)
        both = encode_token_ids(sdxl_parts.text_encoder, ids)
        first = sdxl_parts.text_encoder.text_encoder_2(ids[1][:, 0]).text_embeds
    assert both.states.shape == (2, 1 + 150 + 1, 64)
    torch.testing.assert_close(both.pooled, first)


# ----------------------------------------------------------------------------- size and crop
def test_time_ids_are_the_crop_of_each_image():
    image = Image.new("RGB", (96, 64))  # (width, height)
    centred = cover_and_crop(image, (64, 64), center_crop=True)
    assert centred.time_ids() == (64, 96, 0, 16, 64, 64)  # orig (h, w), crop (top, left), target
    assert centred.time_ids(flipped=True) == (64, 96, 0, 16, 64, 64)  # a centred crop mirrors
    for seed in range(5):
        crop = cover_and_crop(image, (64, 64), center_crop=False, rng=random.Random(seed))
        top, left = crop.time_ids()[2:4]
        assert crop.image.tobytes() == image.crop((left, top, left + 64, top + 64)).tobytes()
        assert crop.time_ids(flipped=True)[3] == 96 - 64 - left
    # a bucket: target size is the bucket's, the crop is in the resized image
    tall = cover_and_crop(Image.new("RGB", (300, 500)), (128, 192), center_crop=True)
    assert tall.cover_size == (128, 213)
    assert tall.time_ids() == (500, 300, 10, 0, 192, 128)


def test_batches_carry_each_rows_time_ids(tmp_path):
    shapes = {"wide.png": (96, 64), "tall.png": (64, 128)}
    for name, size in shapes.items():
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / name)
    data = TrainingData([Example(tmp_path / "wide.png", "zwx", 0)],
                        {0: [Example(tmp_path / "tall.png", "toy", 0)]})
    dataset = DreamBoothDataset(data, 64, center_crop=True, flip=False, seed=1)
    batch = collate([dataset[0]])
    assert batch["time_ids"].tolist() == [[64, 96, 0, 16, 64, 64], [128, 64, 32, 0, 64, 64]]
    # cached latents keep the same numbers (center crop: the crop cached is the crop trained)
    from colab_dreambooth.data.loader import cache_latents

    vae = load_components("tiny-sdxl").vae
    cached = copy.copy(dataset)
    cached.use_latents(cache_latents(dataset, vae, "cpu", torch.float32, progress=False))
    assert torch.equal(collate([cached[0]])["time_ids"], batch["time_ids"])


def test_only_sdxls_own_vae_encodes_in_fp32(sdxl_parts):
    sd_vae = load_components("tiny").vae
    assert vae_compute_dtype(sdxl_parts.vae, torch.float16, sdxl=True) == torch.float32
    assert vae_compute_dtype(sdxl_parts.vae, torch.bfloat16, sdxl=True) == torch.bfloat16
    assert vae_compute_dtype(sd_vae, torch.float16, sdxl=False) == torch.float16
    fixed = copy.deepcopy(sdxl_parts.vae)
    fixed.register_to_config(force_upcast=False)  # madebyollin/sdxl-vae-fp16-fix says so
    assert vae_compute_dtype(fixed, torch.float16, sdxl=True) == torch.float16


# ----------------------------------------------------------------------------- a LoRA run
@pytest.fixture(scope="module")
def lora_run(demo_root, tmp_path_factory):
    """A 3-step SDXL LoRA run with prior preservation (class images generated by the SDXL
    pipeline) and both text encoders' adapters; outputs captured at the final save and the
    time ids every UNet call saw."""
    out = tmp_path_factory.mktemp("sdxl-lora")
    config = demo_config(demo_root, steps=3).copy(
        pretrained_model_name_or_path="tiny-sdxl", models_root=str(out), model_name="zwx-xl",
        use_lora=True, lora_unet_rank=4, lora_txt_rank=2, lora_alpha=2.0,
        lora_learning_rate=1e-2, lora_txt_learning_rate=1e-2, train_batch_size=1,
        cache_latents=False)
    config.concepts_list[0].num_class_images = 3
    captured: dict = {}
    spy = capture_at_save(captured)

    seen: list[torch.Tensor] = []
    from diffusers import UNet2DConditionModel

    forward = UNet2DConditionModel.forward

    def spy_forward(self, *args, added_cond_kwargs=None, **kwargs):
        if self.training and added_cond_kwargs is not None:
            seen.append(added_cond_kwargs["time_ids"].detach().clone())
        return forward(self, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(saving_module, "save_lora_model", spy)
        mp.setattr(UNet2DConditionModel, "forward", spy_forward)
        result = train(config, progress=False)
    state, meta = read_lora(result.lora_file)
    return SimpleNamespace(config=config, result=result, captured=captured, state=state,
                           meta=meta, time_ids=seen)


def test_lora_file_has_kohyas_sdxl_layout(lora_run):
    prefixes = {k.split("_")[1] for k in lora_run.state}
    assert prefixes == {"unet", "te1", "te2"}
    for prefix in ("lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_"):
        moved = [v.abs().max().item() for k, v in lora_run.state.items()
                 if k.startswith(prefix) and k.endswith("lora_up.weight")]
        assert moved and max(moved) > 1e-4  # both encoders trained
    assert lora_run.meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert lora_run.meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert lora_run.meta["ss_v2"] == "False"


def test_training_conditions_on_each_images_size(lora_run):
    """Every training call got one (original h, w, top, left, h, w) row per image: the demo's
    128 px squares at 64 px."""
    assert len(lora_run.time_ids) == 3
    for ids in lora_run.time_ids:
        assert ids.shape == (2, 6)  # the instance row and its class row
        assert ids[:, [0, 1, 4, 5]].tolist() == [[128, 128, 64, 64]] * 2


def test_diffusers_sdxl_loader_reproduces_the_trained_model(lora_run):
    base = sdxl_pipeline()
    before = pipe_outputs(base)
    state = lora_file.state_for_diffusers(lora_run.state, pipeline_text_encoder(base))
    base.load_lora_weights(state)
    loaded = pipe_outputs(base)
    for name in ("states", "pooled", "noise"):
        torch.testing.assert_close(loaded[name], lora_run.captured[name], rtol=1e-5, atol=1e-5)
        assert (loaded[name] - before[name]).abs().max() > 1e-4  # and training changed it


def test_load_lora_pipeline_on_the_sdxl_base(lora_run):
    pipe = load_lora_pipeline("tiny-sdxl", lora_run.result.lora_file, device="cpu")
    torch.testing.assert_close(pipe_outputs(pipe)["noise"], lora_run.captured["noise"],
                               rtol=1e-5, atol=1e-5)
    image = generate_samples(pipe, PROMPT, seed=3, steps=2, height=64, width=64,
                             progress=False)[0]
    assert image.size == (64, 64)


# ----------------------------------------------------------------------------- full fine-tune
@pytest.fixture(scope="module")
def full_run(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl-full")
    config = demo_config(demo_root, steps=2).copy(
        pretrained_model_name_or_path="tiny-sdxl", models_root=str(out), model_name="zwx-xl",
        train_batch_size=1, use_ema=True, enable_bucket=True, cache_latents=True)
    config.concepts_list[0].num_class_images = 2
    return SimpleNamespace(config=config, result=train(config, progress=False))


def test_full_fine_tune_saves_an_sdxl_pipeline(full_run):
    from diffusers import StableDiffusionXLPipeline

    model = full_run.result.model_dir
    for part in ("unet", "unet_ema", "text_encoder", "text_encoder_2", "tokenizer_2", "vae"):
        assert (model / part).is_dir(), part
    base = tiny_sdxl_model_path()

    def weights(folder: Path, part: str) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted((folder / part).glob("*.safetensors"))
                for k, v in load_file(f).items()}

    for part in ("unet", "text_encoder", "text_encoder_2"):
        trained, original = weights(model, part), weights(base, part)
        assert set(trained) == set(original)
        assert any(not torch.equal(trained[k], original[k]) for k in trained), part
    assert all(torch.equal(v, weights(base, "vae")[k]) for k, v in weights(model, "vae").items())
    pipe = load_pipeline(model, device="cpu")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    image = generate_samples(pipe, PROMPT, seed=1, steps=2, height=64, width=64,
                             progress=False)[0]
    assert image.size == (64, 64)


def test_sampling_with_clip_skip_and_long_prompts(full_run):
    """Clip Skip and Max Token Length encode the prompts as training did; with neither, the
    pipeline's own encoding gives the same image as ours."""
    pipe = load_pipeline(full_run.result.model_dir, device="cpu")
    kwargs = dict(seed=5, steps=2, height=64, width=64, progress=False)
    plain = generate_samples(pipe, PROMPT, **kwargs)[0]
    ours = generate_samples(pipe, PROMPT, clip_skip=1, max_token_length=150, **kwargs)[0]
    assert ours.size == plain.size == (64, 64)
    skipped = generate_samples(pipe, PROMPT, clip_skip=2, **kwargs)[0]
    assert skipped.tobytes() != plain.tobytes()
    from colab_dreambooth.generation.sample import _prompt_embeds

    embeds = _prompt_embeds(pipe, PROMPT, "", clip_skip=1, max_token_length=75)
    assert not embeds["negative_pooled_prompt_embeds"].any()  # zeros, as the pipeline's own
    same = pipe(**embeds, num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(5)).images
    again = pipe(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(5)).images
    assert abs(same - again).max() < 1e-5


# ----------------------------------------------------------------------------- resume
def test_full_sdxl_stop_then_resume_equals_an_uninterrupted_run(demo_root, tmp_path):
    """Both text encoders trained, EMA, buckets, random crops and flips, accumulation: stopped
    at step 3 and resumed, the run ends with the losses and weights of one never stopped."""
    import threading

    def config(name):
        c = demo_config(demo_root, steps=5).copy(
            pretrained_model_name_or_path="tiny-sdxl", models_root=str(tmp_path),
            model_name=name, seed=11, train_batch_size=1, train_text_encoder=True,
            use_ema=True, enable_bucket=True, hflip=True, center_crop=False,
            gradient_accumulation_steps=2, save_every_steps=2, checkpoints_to_keep=1,
            cache_latents=False, lr_scheduler="cosine", lr_warmup_steps=1)
        c.concepts_list[0].num_class_images = 2
        return c

    whole = train(config("whole"), progress=False)
    stop = threading.Event()
    first = train(config("split"), stop=stop, progress=False,
                  on_step=lambda step, loss, lr: step == 3 and stop.set())
    assert first.stopped_early and first.steps == 3
    second = train(config("split"), resume=True, progress=False)
    assert second.losses == whole.losses and second.steps == 5

    def weights(model: Path) -> dict[str, torch.Tensor]:
        return {f"{part}.{k}": v for part in ("unet", "unet_ema", "text_encoder", "text_encoder_2")
                for f in sorted((model / part).glob("*.safetensors"))
                for k, v in load_file(f).items()}

    a, b = weights(whole.model_dir), weights(second.model_dir)
    assert a.keys() == b.keys() and any(k.startswith("text_encoder_2.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_then_resume_matches_an_uninterrupted_sdxl_lora_run(demo_root, tmp_path):
    base = demo_config(demo_root, steps=8).copy(
        pretrained_model_name_or_path="tiny-sdxl", models_root=str(tmp_path), seed=7,
        use_lora=True, lora_unet_rank=4, lora_txt_rank=2, lora_learning_rate=1e-2,
        lora_txt_learning_rate=1e-2, hflip=True, center_crop=False, train_batch_size=1,
        cache_latents=False, save_every_steps=2, checkpoints_to_keep=2,
        save_preview_every=0, save_preview_every_steps=0)
    base.concepts_list[0].num_class_images = 2
    whole, killed = train_whole_and_killed(base, tmp_path)
    a = read_lora(whole / "lora" / "whole.safetensors")[0]
    b = read_lora(killed / "lora" / "killed.safetensors")[0]
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_model_card_of_an_sdxl_lora(lora_run):
    from colab_dreambooth.publish.model_card import card_text

    card = card_text(lora_run.config)
    assert "StableDiffusionXLPipeline.from_pretrained" in card
    assert "- stable-diffusion-xl" in card and "StableDiffusionPipeline" not in card


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_prompts_encoded_up_front_equal_those_encoded_per_batch(model):
    """With frozen text encoders every prompt is encoded once before the run (so the encoders
    can leave the GPU); a batch then gets the states and pooled embeddings it would have got."""
    from colab_dreambooth.training.step import PromptStates

    parts = load_components(model)
    prompts = [PROMPT, "a toy, toy", ", ".join(["zwx toy on a table"] * 16)]

    def states():
        return PromptStates(parts.tokenizers, parts.text_encoder, pad_tokens=True,
                            max_token_length=150, clip_skip=2)

    per_batch = states()(prompts, trains_text=False)
    up_front = states()
    up_front.encode_all(prompts + prompts[:1], "cpu")
    cached = up_front(prompts, trains_text=False)
    torch.testing.assert_close(cached.states, per_batch.states, rtol=1e-5, atol=1e-5)
    if model == "tiny-sdxl":
        torch.testing.assert_close(cached.pooled, per_batch.pooled, rtol=1e-5, atol=1e-5)
    else:
        assert cached.pooled is None


# ----------------------------------------------------------------------------- another VAE
def _fixed_vae(folder: Path) -> Path:
    """A copy of the tiny SDXL VAE that says it runs in fp16 (as sdxl-vae-fp16-fix does),
    with weights of its own."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sdxl_model_path() / "vae")
    vae.register_to_config(force_upcast=False)
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.25)
    vae.save_pretrained(folder)
    return folder


def test_another_vae_trains_and_is_saved_with_the_model(demo_root, tmp_path):
    from colab_dreambooth.models.loading import load_vae

    fixed = _fixed_vae(tmp_path / "fixed-vae")
    config = demo_config(demo_root, steps=1).copy(
        pretrained_model_name_or_path="tiny-sdxl", models_root=str(tmp_path / "runs"),
        model_name="vae-run", pretrained_vae_name_or_path=str(fixed), train_batch_size=1,
        train_text_encoder=False)
    config.concepts_list[0].num_class_images = 2
    result = train(config, progress=False)
    saved = load_file(next((result.model_dir / "vae").glob("*.safetensors")))
    own = load_file(next(fixed.glob("*.safetensors")))
    assert all(torch.equal(saved[k], own[k]) for k in own)
    # a single-file VAE (the original layout) reads offline with the base model's config
    from colab_dreambooth.models.single_file import ldm_keys

    vae = load_vae(str(fixed), tiny_sdxl_model_path())[0]
    state = vae.state_dict()
    ldm = {}
    for link in ldm_keys.vae_links(state, vae.config):
        tensor = state[link.diffusers[0]]
        ldm[link.ldm] = tensor[:, :, None, None] if link.conv1x1 and tensor.dim() == 2 else tensor
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ldm.items()}, tmp_path / "vae.safetensors")
    single, folder = load_vae(str(tmp_path / "vae.safetensors"), tiny_sdxl_model_path())
    assert folder is None
    assert all(torch.equal(single.state_dict()[k], v) for k, v in state.items())


def test_a_missing_vae_is_named_before_anything_loads(tiny_config, tmp_path):
    from colab_dreambooth.config.validation import validate

    config = tiny_config.copy(pretrained_vae_name_or_path=str(tmp_path / "no-such-vae"))
    problems = [p for p in validate(config) if p.where == "pretrained_vae_name_or_path"]
    assert problems and "does not exist" in problems[0].message


def _tuned_sdxl(target: Path) -> Path:
    """The tiny SDXL model with every attention/MLP weight of its UNet and both text encoders
    changed (layers a LoRA holds), saved as a full fine-tune is."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(tiny_sdxl_model_path(), target)
    g = torch.Generator().manual_seed(0)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        for file in (target / part).glob("*.safetensors"):
            state = load_file(file)
            for name, tensor in state.items():
                if tensor.dim() >= 2 and any(k in name for k in ("attn", "mlp.fc")):
                    state[name] = tensor + 0.05 * torch.randn(tensor.shape, generator=g)
            save_file(state, file, metadata={"format": "pt"})
    return target


def test_extract_lora_from_a_full_sdxl_fine_tune(tmp_path):
    """extract-lora on SDXL: both text encoders as lora_te1_/lora_te2_; at full rank without
    clamping, diffusers' SDXL loader on the base gives the fine-tuned model's outputs."""
    from colab_dreambooth.models.lora_extract import extract_lora

    tuned = _tuned_sdxl(tmp_path / "tuned")
    out = tmp_path / "x.safetensors"
    report = extract_lora("tiny-sdxl", tuned, out, rank=64, clamp_quantile=1.0,
                          save_precision="fp32", progress=False)
    assert report.layers["text_encoder"] and report.layers["text_encoder_2"]
    state, meta = read_lora(out)
    assert {k.split("_")[1] for k in state} == {"unet", "te1", "te2"}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    base = sdxl_pipeline()
    before = pipe_outputs(base)
    base.load_lora_weights(lora_file.state_for_diffusers(state, pipeline_text_encoder(base)))
    got, want = pipe_outputs(base), pipe_outputs(load_pipeline(tuned, device="cpu"))
    for name in ("states", "pooled", "noise"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4)
        assert (want[name] - before[name]).abs().max() > 1e-3


@pytest.mark.parametrize("model,lora,clip_skip", [("tiny-sdxl", False, 1), ("tiny-sdxl", True, 2),
                                                  ("tiny", False, 2), ("tiny", True, 1)])
def test_every_trained_weight_gets_a_gradient(demo_root, model, lora, clip_skip):
    """Layers the conditioning never reads (SDXL's first encoder after its penultimate state,
    SD's last layers under Clip Skip) are frozen: several GPUs (DistributedDataParallel)
    refuse parameters without a gradient."""
    from colab_dreambooth.runtime.device import DeviceInfo
    from colab_dreambooth.training.placement import make_accelerator, place_models

    config = demo_config(demo_root).copy(pretrained_model_name_or_path=model, use_lora=lora,
                                         train_text_encoder=True, clip_skip=clip_skip)
    parts = load_components(model)
    placed = place_models(parts.unet, parts.text_encoder, parts.vae, config,
                          make_accelerator(config, DeviceInfo.cpu()))
    condition = encode_token_ids(placed.text_encoder,
                                 prompt_token_ids(parts.tokenizers, [PROMPT]), clip_skip)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    out = placed.unet(latents, 10, condition.states, **condition.unet_kwargs(time_ids)).sample
    out.square().mean().backward()
    trained = {name: p for module in (placed.unet, placed.text_encoder)
               for name, p in module.named_parameters() if p.requires_grad}
    assert any("text_encoder" in n or "text_model" in n or "encoder.layers" in n
               for n in trained)
    assert [n for n, p in trained.items() if p.grad is None] == []


@pytest.mark.parametrize("lora_type", ["LoCon", "LoHa"])
def test_lycoris_types_on_sdxl_load_back(demo_root, tmp_path, lora_type):
    """LoCon (3x3 convolutions too; diffusers' loader) and LoHa (peft) train on SDXL and load
    onto the base as the trained model."""
    config = demo_config(demo_root, steps=2).copy(
        pretrained_model_name_or_path="tiny-sdxl", models_root=str(tmp_path), model_name="ly",
        use_lora=True, lora_type=lora_type, lora_unet_rank=4, lora_txt_rank=2,
        lora_conv_rank=2, lora_learning_rate=1e-2, lora_txt_learning_rate=1e-2,
        train_batch_size=1)
    config.concepts_list[0].num_class_images = 2
    captured: dict = {}
    spy = capture_at_save(captured)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(saving_module, "save_lora_model", spy)
        result = train(config, progress=False)
    state = read_lora(result.lora_file)[0]
    assert {k.split("_")[1] for k in state} == {"unet", "te1", "te2"}
    pipe = load_lora_pipeline("tiny-sdxl", result.lora_file, device="cpu")
    loaded = pipe_outputs(pipe)
    for name in ("states", "pooled", "noise"):
        torch.testing.assert_close(loaded[name], captured[name], rtol=1e-4, atol=1e-4)
    if lora_type == "LoCon":
        _lycoris_reads_it(state, captured, tmp_path)


def _lycoris_reads_it(state: dict, captured: dict, tmp_path: Path) -> None:
    """LyCORIS's own SDXL network (two text encoders: lora_te1_/lora_te2_), the layout the
    WebUI and ComfyUI follow, has our file's keys and shapes and computes the trained model's
    outputs from it."""
    kohya = pytest.importorskip("lycoris.kohya")
    parts = load_components("tiny-sdxl")
    encoders = list(text_parts(parts.text_encoder).values())
    # LyCORIS names a module as it finds it: transformers 5 flattened CLIPTextModel (the first
    # encoder) but not CLIPTextModelWithProjection (the second).
    weights = {(k.replace("lora_te1_text_model_", "lora_te1_")
                if not hasattr(encoders[0], "text_model") else k): v for k, v in state.items()}
    preset = tmp_path / "preset.toml"
    preset.write_text(
        'enable_conv = true\nunet_target_module = ["Transformer2DModel", "ResnetBlock2D", '
        '"Downsample2D", "Upsample2D"]\nunet_target_name = []\n'
        'text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]\n'
        'text_encoder_target_name = []\n', encoding="utf-8")
    from lycoris.utils.preset import read_preset

    # Loading from weights keeps the class-wide preset of the last network made: set kohya's
    # LoCon targets (LyCORIS's default "full" also adapts the time and size embeddings).
    kohya.LycorisNetworkKohya.apply_preset(read_preset(str(preset)))
    network, _ = kohya.create_network_from_weights(1.0, None, parts.vae, encoders, parts.unet,
                                                   weights_sd=weights)
    network.apply_to(encoders, parts.unet, True, True)
    network.load_state_dict(weights)
    theirs = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    assert theirs == {k: tuple(v.shape) for k, v in weights.items()}
    got = outputs(parts.unet.eval(), parts.text_encoder.eval(), parts.tokenizers)
    for name in ("states", "pooled", "noise"):
        torch.testing.assert_close(got[name], captured[name], rtol=1e-4, atol=1e-4)


def test_sdxl_below_768_px_is_warned(tiny_config, caplog):
    from colab_dreambooth.training.train import _warn_low_resolution

    for base, resolution, warned in (("stabilityai/stable-diffusion-xl-base-1.0", 512, True),
                                     ("stabilityai/stable-diffusion-xl-base-1.0", 1024, False),
                                     ("stable-diffusion-v1-5/stable-diffusion-v1-5", 512, False),
                                     ("tiny-sdxl", 64, False)):
        caplog.clear()
        _warn_low_resolution(tiny_config.copy(pretrained_model_name_or_path=base,
                                              resolution=resolution))
        assert ("SDXL was trained at 1024 px" in caplog.text) == warned, base


def test_release_of_an_sdxl_fine_tune(full_run, tmp_path):
    """Notebook 04's release on SDXL: the single file (which Create Model reads back as an
    SDXL folder), the card, a dehydrated copy and an extracted LoRA, sent to a folder."""
    from colab_dreambooth.models.families import file_family
    from colab_dreambooth.publish.release import ReleaseSettings, make_release

    settings = ReleaseSettings(fp16=True, dehydrate=True, extract_lora=True, extract_rank=4,
                               destination=str(tmp_path / "drive"))
    result = make_release(full_run.config, settings, progress=False)
    assert file_family(result.export) == SDXL
    assert "StableDiffusionXLPipeline" in result.card.read_text(encoding="utf-8")
    assert result.dehydrated.is_file() and result.extracted.is_file()
    # Two steps move the text encoders less than kohya's min_diff: the UNet's layers only.
    assert {k.split("_")[1] for k in read_lora(result.extracted)[0]} == {"unet"}
    sent = tmp_path / "drive" / "zwx-xl"
    assert (sent / result.export.name).is_file() and (sent / "text_encoder_2").is_dir()
