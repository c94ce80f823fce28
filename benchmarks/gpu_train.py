"""Training speed and peak memory of full-size SD 1.5 (or SDXL) per GPU preset, random weights.

What it measures
    For each GPU preset (:mod:`colab_dreambooth.config.presets`) it builds the SD 1.5 UNet, CLIP
    text
    encoder and VAE from the shipped ``colab_dreambooth/models/single_file/configs/sd1.json`` with
    random weights (nothing is downloaded), applies the preset's settings to a DreamBooth
    configuration at 512 px with prior preservation (each step trains on ``batch`` instance rows
    plus as many class rows), and runs real training steps through ``train()``'s own phases:
    :func:`~colab_dreambooth.training.placement.place_models` (freezing, dtypes, Half model,
    LoRA adapters with ``--lora``, memory attention, gradient checkpointing),
    :func:`~colab_dreambooth.training.optim.make_training_optimizer` (8-bit AdamW or torch's
    fused AdamW), the same Accelerator, and
    :class:`~colab_dreambooth.training.step.TrainingStep` (latents scaled by the VAE's own
    factor, the DreamBooth loss, clipping, the schedule), EMA when on. The batches are random,
    collated as the loader collates them: cached latent distributions, or pixels the step
    encodes with the VAE when the preset does not cache latents; the SD 1.5 shapes use a
    stand-in tokenizer.
    It prints per preset:

    * s/step (mean over ``--steps`` steps after ``--warmup``), images/s (rows per second);
    * peak GPU memory allocated and reserved (``torch.cuda.max_memory_*``), and the package's
      estimate for the same configuration (:func:`estimate_peak_memory`) beside it;
    * peak host memory (``ru_maxrss`` of the process that ran the preset);
    * achieved TFLOP/s and its fraction of the GPU's peak dense fp16/bf16 tensor throughput.
      FLOPs per row: the SD 1.5 UNet forward at 64x64 latents is ~0.8 TFLOP, the backward about
      twice that, and gradient checkpointing recomputes the forward once more (LoRA's backward
      computes only input gradients through the frozen base: ~1x the forward); the text
      encoder adds 2 x parameters x 77 tokens per pass. Scaled by (resolution / 512)^2.

    A smaller GPU is imitated on a larger one by capping the process's memory with
    ``torch.cuda.set_per_process_memory_fraction``: by default each preset of a smaller GPU runs
    capped to that GPU's memory (a T4 at 15 GB), so "OOM" there means it would not fit the real
    card. The cap limits memory only: speed is the larger GPU's. Each preset runs in a fresh
    process, so its memory figures are its own.

Usage
    python benchmarks/gpu_train.py                          # every preset this GPU can imitate
    python benchmarks/gpu_train.py --preset T4 --steps 20   # one preset, capped to 15 GB
    python benchmarks/gpu_train.py --preset H100 --batch 16 --compile --fused-adamw
    python benchmarks/gpu_train.py --preset T4 --no-text-encoder   # the UNet-only figure
    python benchmarks/gpu_train.py --tiny                   # tiny shapes, 2 steps, CPU is fine
    python benchmarks/gpu_train.py --family sdxl --preset A100-80 H100   # SDXL at 1024 px
    python benchmarks/gpu_train.py --family sdxl --lora --preset T4

``--family sdxl`` builds SDXL base 1.0's UNet, both text encoders (CLIP-L, OpenCLIP bigG with
projection) and VAE from the configs written in this file (:data:`SDXL_CONFIGS`, the fields of
stabilityai/stable-diffusion-xl-base-1.0's config files that shape the models), with stand-in
tokenizers, trains at 1024 px with each image's size/crop conditioning, takes each preset's
SDXL values and compares with the SDXL estimate. Its UNet forward is ~6.8 TFLOP per row at
1024 px (torch.utils.flop_counter on the meta device; SD 1.5's 0.80 at 512 px counts the same).

``--tiny`` uses the tiny built-in model (same topology, tiny widths) so the script runs (and is
tested) on a CPU; its figures mean nothing. Record real figures, with the GPU's name, in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

GIB = 2**30
UNET_FORWARD_FLOP = 0.8e12  # per row at 512 px (64x64 latents), SD 1.5
SD15_UNET_PARAMS = 859_520_964
SDXL_UNET_FORWARD_FLOP = 6.76e12  # per row at 1024 px (128x128 latents), SDXL base
SDXL_UNET_PARAMS = 2_567_463_684
TOKENS = 77
# SDXL base 1.0's configs (stabilityai/stable-diffusion-xl-base-1.0: unet/, text_encoder/,
# text_encoder_2/, vae/, scheduler/), the fields that shape the models; the rest default.
SDXL_CONFIGS = {
    "unet": {
        "act_fn": "silu", "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
        "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "in_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": True},
    "text_encoder": {
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "vocab_size": 49408, "max_position_embeddings": 77,
        "hidden_act": "quick_gelu", "projection_dim": 768},
    "text_encoder_2": {
        "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
        "num_attention_heads": 20, "vocab_size": 49408, "max_position_embeddings": 77,
        "hidden_act": "gelu", "projection_dim": 1280},
    "vae": {
        "block_out_channels": [128, 256, 512, 512], "latent_channels": 4,
        "layers_per_block": 2, "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 1024,
        "scaling_factor": 0.13025, "force_upcast": True},
    "scheduler": {
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "steps_offset": 1, "prediction_type": "epsilon",
        "timestep_spacing": "leading"},
}
# Peak dense fp16/bf16 tensor-core FLOP/s (no sparsity), from the vendors' data sheets; the
# first pattern that matches the GPU's name wins.
PEAK_FLOPS = (
    (r"H100.*PCIe", 756e12), (r"H100.*NVL", 835e12), (r"H100|H200|GH200", 989e12),
    (r"A100", 312e12), (r"L40S", 362e12), (r"\bL4\b", 121e12), (r"A10G", 70e12),
    (r"\bA10\b", 125e12), (r"V100.*PCIE", 112e12), (r"V100", 125e12), (r"\bT4\b", 65e12),
    (r"RTX 4090", 165e12), (r"RTX 3090", 71e12),
)


def peak_flops(gpu_name: str) -> float | None:
    """The GPU's peak dense fp16/bf16 FLOP/s, or None when this table does not know it."""
    for pattern, flops in PEAK_FLOPS:
        if re.search(pattern, gpu_name, re.IGNORECASE):
            return flops
    return None


def step_flops(rows: int, resolution: int, unet_params: int, text_params: int, *,
               checkpointing: bool, lora: bool, trains_text: bool, sdxl: bool = False) -> float:
    """FLOPs of one training step over ``rows`` images (see the module docstring)."""
    if sdxl:
        unet_forward = (SDXL_UNET_FORWARD_FLOP * (resolution / 1024) ** 2
                        * unet_params / SDXL_UNET_PARAMS)
    else:
        unet_forward = UNET_FORWARD_FLOP * (resolution / 512) ** 2 * unet_params / SD15_UNET_PARAMS
    unet_passes = 1 + (1 if lora else 2) + (1 if checkpointing else 0)
    text_forward = 2 * text_params * TOKENS
    text_passes = (1 + 2 + (1 if checkpointing else 0)) if trains_text else 1
    return rows * (unet_forward * unet_passes + text_forward * text_passes)


class _StandInTokenizer:
    """Fixed token ids per prompt, for the full-size shapes (no tokenizer is downloaded);
    ``pad_token_id`` 0 ("!") is SDXL's second tokenizer."""

    bos_token_id, eos_token_id = 49406, 49407

    def __init__(self, pad_token_id: int = 49407):
        self.pad_token_id = pad_token_id

    def __call__(self, prompts: list[str], **_):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=[[hash((p, i)) % 49406 for i in range(8)]
                                          for p in prompts])


def build_models(tiny: bool, device, family: str = "sd"):
    """UNet, text encoder (SDXL: both, as one DualTextEncoder), VAE, noise scheduler and
    tokenizers: SD 1.5's or SDXL base's shapes with random weights (created directly on
    ``device``) and stand-in tokenizers, or the tiny model of the family."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if tiny:
        from colab_dreambooth.models.loading import load_components

        parts = load_components("tiny-sdxl" if family == "sdxl" else "tiny")
        return (parts.unet, parts.text_encoder, parts.vae, parts.noise_scheduler,
                parts.tokenizers)
    if family == "sdxl":
        from colab_dreambooth.models.text_encoding import DualTextEncoder

        with torch.device(device):
            unet = UNet2DConditionModel.from_config(SDXL_CONFIGS["unet"])
            text_encoder = DualTextEncoder(
                CLIPTextModel(CLIPTextConfig(**SDXL_CONFIGS["text_encoder"])),
                CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_CONFIGS["text_encoder_2"])))
            vae = AutoencoderKL.from_config(SDXL_CONFIGS["vae"])
        return (unet, text_encoder, vae, DDPMScheduler.from_config(SDXL_CONFIGS["scheduler"]),
                (_StandInTokenizer(), _StandInTokenizer(pad_token_id=0)))
    configs = json.loads((REPO / "colab_dreambooth" / "models" / "single_file" / "configs"
                          / "sd1.json").read_text())
    text_config = {k: v for k, v in configs["text_encoder"].items() if k != "architectures"}
    with torch.device(device):  # random init on the GPU: seconds instead of a minute on CPU
        unet = UNet2DConditionModel.from_config(configs["unet"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        vae = AutoencoderKL.from_config(configs["vae"])
    return (unet, text_encoder, vae, DDPMScheduler.from_config(configs["scheduler"]),
            (_StandInTokenizer(),))


def run_preset(name: str, args: argparse.Namespace) -> dict:
    """Train ``args.steps`` timed steps with preset ``name``; return the figures."""
    import importlib.util
    import warnings

    import torch

    from colab_dreambooth.config.concept import Concept
    from colab_dreambooth.config.presets import PRESETS_BY_NAME, apply_preset
    from colab_dreambooth.config.settings import DreamBoothConfig
    from colab_dreambooth.runtime.device import DeviceInfo, detect_device
    from colab_dreambooth.training.memory import (
        SD15,
        SDXL_BASE,
        count_parameters,
        estimate_peak_memory,
    )

    warnings.filterwarnings("ignore")
    device = detect_device() if not args.cpu else DeviceInfo.cpu()
    on_cuda = device.kind == "cuda"
    preset = PRESETS_BY_NAME[name]
    cap = args.memory_cap_gb
    if cap is None and not args.no_cap and on_cuda and preset.memory_gb < device.memory_gb - 1:
        cap = preset.memory_gb  # imitate the smaller GPU's memory
    if on_cuda and cap:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / device.memory_gb))
        device = DeviceInfo(device.kind, device.name, cap, device.bf16, device.count,
                            device.capability)
    concept = Concept(instance_prompt="photo of sks dog", instance_data_dir="/unused",
                      class_prompt="" if args.no_prior else "photo of a dog",
                      num_class_images=0 if args.no_prior else 100)
    sdxl = args.family == "sdxl"
    model = {(True, False): "tiny", (True, True): "tiny-sdxl", (False, False):
             "stable-diffusion-v1-5", (False, True): "stabilityai/stable-diffusion-xl-base-1.0"}
    config = DreamBoothConfig(
        pretrained_model_name_or_path=model[args.tiny, sdxl],
        resolution=args.resolution, train_batch_size=args.batch, use_lora=args.lora,
        lora_type=args.lora_type, use_dora=args.dora, lora_conv_rank=args.conv_rank,
        train_text_encoder=False if args.no_text_encoder else None, concepts_list=[concept])
    sizes = (count_parameters(_tiny_folder(sdxl), "the tiny model") if args.tiny
             else SDXL_BASE if sdxl else SD15)
    config = apply_preset(config, device, preset, family=sizes.family)[0]
    rows = config.train_batch_size * (1 if args.no_prior else 2)
    result = {"preset": name, "family": args.family, "gpu": device.name, "memory_cap_gb": cap,
              "precision": config.mixed_precision if on_cuda else "no",
              # What runs: make_optimizer falls back to torch AdamW without CUDA/bitsandbytes.
              "use_8bit_adam": bool(config.use_8bit_adam) and on_cuda
              and importlib.util.find_spec("bitsandbytes") is not None,
              "checkpointing": bool(config.gradient_checkpointing),
              "attention": config.attention, "cache_latents": bool(config.cache_latents),
              "batch": config.train_batch_size, "rows": rows, "lora": config.use_lora,
              "lora_type": (config.lora_type + ("+DoRA" if config.use_dora else ""))
              if config.use_lora else "",
              "train_text_encoder": bool(config.train_text_encoder), "compile": args.compile,
              "fused_adamw": args.fused_adamw, "resolution": config.resolution}
    result["estimate_gb"] = estimate_peak_memory(
        config, device, sizes=sizes,
        bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None).total_gb
    try:
        result.update(_train_steps(config, args, on_cuda, rows, sizes))
    except torch.cuda.OutOfMemoryError as exc:
        result["error"] = "OOM"
        result["detail"] = str(exc).splitlines()[0][:200]
    if on_cuda:
        result["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / GIB
        result["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / GIB
    result["peak_host_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    peak = peak_flops(device.name) if on_cuda else None
    if "s_per_step" in result:
        flops = step_flops(rows, config.resolution, sizes.unet, sizes.text_encoders,
                           checkpointing=bool(config.gradient_checkpointing), lora=config.use_lora,
                           trains_text=bool(config.train_text_encoder), sdxl=sdxl)
        result["tflops"] = flops / result["s_per_step"] / 1e12
        result["fraction_of_peak"] = flops / result["s_per_step"] / peak if peak else None
    return result


def _tiny_folder(sdxl: bool = False) -> Path:
    from colab_dreambooth.models.tiny import tiny_model_path, tiny_sdxl_model_path

    return tiny_sdxl_model_path() if sdxl else tiny_model_path()


def _train_steps(config, args, on_cuda: bool, rows: int, sizes) -> dict:
    """``train()``'s own setup phases and step on random inputs; returns the timings."""
    import torch

    from colab_dreambooth.runtime.device import DeviceInfo, detect_device
    from colab_dreambooth.training.noise import make_noise_scheduler
    from colab_dreambooth.training.numerics import (
        allow_fp16_gradient_unscale,
        apply_numerics,
    )
    from colab_dreambooth.training.optim import EMA, make_training_optimizer
    from colab_dreambooth.training.placement import make_accelerator, place_models
    from colab_dreambooth.training.step import PromptStates, TrainingStep

    # One optimizer step per timed step.
    config = config.copy(gradient_accumulation_steps=1, use_cpu=not on_cuda)
    device = detect_device() if on_cuda else DeviceInfo.cpu()
    accelerator = make_accelerator(config, device)
    unet, text_encoder, vae, noise_scheduler, tokenizers = build_models(
        args.tiny, accelerator.device, args.family)
    numerics = apply_numerics(tf32=config.allow_tf32, deterministic=config.deterministic)
    models = place_models(unet, text_encoder, vae, config, accelerator)
    trains_text = bool(config.train_text_encoder)
    if config.cache_latents:
        models.vae.to("cpu")  # as train() does once the latents are cached
    optimizer, lr_scheduler = make_training_optimizer(
        config, models.unet, models.text_encoder, total_steps=args.warmup + args.steps,
        on_cuda=on_cuda)
    unet = torch.compile(models.unet) if args.compile else models.unet
    if trains_text:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(
            unet, models.text_encoder, optimizer, lr_scheduler)
    else:
        text_encoder = models.text_encoder
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if models.half == torch.float16:
        allow_fp16_gradient_unscale(accelerator)
    ema = EMA(unet.parameters(), config.ema_decay, "cpu" if config.ema_on_cpu else None) \
        if config.use_ema else None
    step = TrainingStep(
        accelerator, unet, text_encoder, models.vae,
        PromptStates(tokenizers, text_encoder, pad_tokens=config.pad_tokens,
                     max_token_length=config.max_token_length, clip_skip=config.clip_skip),
        make_noise_scheduler(config.noise_scheduler, noise_scheduler.config),
        optimizer, lr_scheduler, models.weight_dtype, config.prior_loss_weight,
        config.offset_noise, config.min_snr_gamma, config.max_grad_norm, models.vae_dtype)

    side = config.resolution // 8
    generator = torch.Generator(device="cpu").manual_seed(0)
    prompts = (["photo of sks dog"] * config.train_batch_size
               + ["photo of a dog"] * (rows - config.train_batch_size))
    stamps = []
    try:
        for _ in range(args.warmup + args.steps):
            # A collated batch as the loader gives it: cached latent distributions, or pixels
            # that the step encodes with the VAE.
            if config.cache_latents:
                mean = torch.randn(rows, 4, side, side, generator=generator)
                batch = {"pixels": None, "latent_mean": mean,
                         "latent_std": torch.full_like(mean, 0.01)}
            else:
                pixels = torch.rand(rows, 3, config.resolution, config.resolution,
                                    generator=generator) * 2 - 1
                batch = {"pixels": pixels, "latent_mean": None, "latent_std": None}
            batch.update(prompts=prompts, num_instance=config.train_batch_size)
            if len(tokenizers) == 2:  # SDXL: each image's size/crop conditioning
                size = float(config.resolution)
                batch["time_ids"] = torch.tensor([[size, size, 0.0, 0.0, size, size]] * rows)
            loss = step(batch, trains_text)
            if ema:
                ema.update(unet.parameters())
            if on_cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
    finally:
        numerics.restore()
    timed = stamps[args.warmup - 1:] if args.warmup else stamps
    if len(timed) < 2:
        return {"loss": float(loss)}
    s_per_step = (timed[-1] - timed[0]) / (len(timed) - 1)
    return {"s_per_step": s_per_step, "images_per_s": rows / s_per_step, "loss": float(loss),
            "steps": args.steps}


def _default_presets(args: argparse.Namespace) -> list[str]:
    """Every GPU preset whose memory this GPU holds (the CPU's with --tiny on a CPU)."""
    from colab_dreambooth.config.presets import PRESETS, choose_preset
    from colab_dreambooth.runtime.device import detect_device

    device = detect_device()
    if device.kind != "cuda":
        return ["CPU"] if args.tiny else []
    own = choose_preset(device)
    return [p.name for p in PRESETS if p.name not in ("CPU", "small")
            and p.memory_gb <= own.memory_gb]


def _table(results: list[dict]) -> str:
    head = ("preset", "batch", "rows", "prec", "8bit", "ckpt", "TE", "cap GB", "s/step",
            "img/s", "alloc GB", "resv GB", "est GB", "host GB", "TFLOP/s", "of peak")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in results:
        def num(key, fmt):
            value = r.get(key)
            return fmt.format(value) if isinstance(value, (int, float)) else "-"
        cells = [r["preset"] + (" SDXL" if r.get("family") == "sdxl" else "")
                 + (" " + (r.get("lora_type") or "LoRA") if r["lora"] else ""),
                 str(r["batch"]), str(r["rows"]),
                 r["precision"], "y" if r["use_8bit_adam"] else "n",
                 "y" if r["checkpointing"] else "n", "y" if r["train_text_encoder"] else "n",
                 num("memory_cap_gb", "{:.1f}"),
                 r.get("error") or num("s_per_step", "{:.3f}"), num("images_per_s", "{:.2f}"),
                 num("peak_allocated_gb", "{:.2f}"), num("peak_reserved_gb", "{:.2f}"),
                 num("estimate_gb", "{:.2f}"), num("peak_host_gb", "{:.2f}"),
                 num("tflops", "{:.1f}"),
                 num("fraction_of_peak", "{:.0%}") if r.get("fraction_of_peak") else "-"]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def _child_options(args: argparse.Namespace) -> list[str]:
    """The options of this run, for a child process that runs one preset."""
    options = ["--steps", str(args.steps), "--warmup", str(args.warmup),
               "--resolution", str(args.resolution), "--family", args.family]
    if args.batch is not None:
        options += ["--batch", str(args.batch)]
    if args.memory_cap_gb is not None:
        options += ["--memory-cap-gb", str(args.memory_cap_gb)]
    options += ["--lora-type", args.lora_type, "--conv-rank", str(args.conv_rank)]
    for flag in ("no_cap", "compile", "fused_adamw", "no_text_encoder", "no_prior", "lora",
                 "dora", "tiny", "cpu"):
        if getattr(args, flag):
            options.append("--" + flag.replace("_", "-"))
    return options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from colab_dreambooth.config.settings import LORA_TYPES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", nargs="+", help="preset names (default: every preset this GPU "
                   "can imitate)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3; "
                   "--tiny 1)")
    p.add_argument("--batch", type=int, default=None, help="instance images per step "
                   "(default: the preset's)")
    p.add_argument("--family", choices=("sd", "sdxl"), default="sd", help="SD 1.5's shapes "
                   "(default) or SDXL base's, with each preset's SDXL values")
    p.add_argument("--resolution", type=int, default=None, help="default 512, SDXL 1024 "
                   "(--tiny 64)")
    p.add_argument("--memory-cap-gb", type=float, default=None, help="cap the process's GPU "
                   "memory (default: the preset's GPU memory when smaller than this GPU's)")
    p.add_argument("--no-cap", action="store_true", help="never cap the GPU memory")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--fused-adamw", action="store_true", help="torch's fused AdamW kernel "
                   "(when the preset does not use 8-bit Adam; now always so on a GPU)")
    p.add_argument("--no-text-encoder", action="store_true", help="train the UNet only")
    p.add_argument("--no-prior", action="store_true", help="no class rows (half the rows)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters")
    p.add_argument("--lora-type", default="LoRA", choices=LORA_TYPES,
                   help="with --lora: the adapter type (default LoRA)")
    p.add_argument("--dora", action="store_true", help="with --lora: DoRA (LoRA, LoCon)")
    p.add_argument("--conv-rank", type=int, default=4, help="with --lora-type LoCon/LoHa/LoKr: "
                   "the 3x3 convolutions' rank (default 4; 0: none)")
    p.add_argument("--tiny", action="store_true", help="the tiny model (tests; runs on a CPU)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even with a GPU")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process
    args = p.parse_args(argv)
    tiny = args.tiny
    args.steps = args.steps if args.steps is not None else (2 if tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    args.resolution = args.resolution or (64 if tiny else 1024 if args.family == "sdxl" else 512)
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the presets and print the table; returns the results."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    names = args.preset or _default_presets(args)
    if not names:
        print("No CUDA GPU here: run with --tiny (tiny shapes on the CPU) or on a GPU.")
        return []
    if args.one or len(names) == 1:
        results = [run_preset(name, args) for name in names]
    else:  # a fresh process per preset: its own peak memory and memory cap
        results = []
        for name in names:
            child = subprocess.run([sys.executable, __file__, "--one", "--preset", name,
                                    *_child_options(args)], capture_output=True, text=True)
            lines = [ln for ln in child.stdout.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                print(f"{name}: failed\n{child.stderr[-2000:]}", file=sys.stderr)
                continue
            results.append(json.loads(lines[-1][len("RESULT "):]))
    if args.one:
        print("RESULT " + json.dumps(results[-1]))
        return results
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.cpu else "CPU"
    print(f"GPU: {gpu}; torch {torch.__version__}; {args.steps} timed steps after "
          f"{args.warmup} warm-up; {args.resolution} px; "
          f"{'no class rows' if args.no_prior else 'prior preservation (2 rows per image)'}")
    print(_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
