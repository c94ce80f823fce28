"""Dehydrated file size, time, peak memory and reconstruction error on a full-size SD 1.5 model.

What it measures
    A Stable Diffusion 1.5-shaped model (UNet 860M parameters, CLIP ViT-L text encoder 123M,
    VAE 84M; fp32, random seeded weights: sizes, time and memory do not depend on the values) is
    saved as the base diffusers folder. A copy is "trained": every UNet and text-encoder matrix
    gets a change of a decaying-spectrum low-rank part plus i.i.d. noise (the noise carries
    ``--noise-share`` of the change's energy; DreamBooth changes are far from exactly low-rank),
    biases and norms get noise, two token-embedding rows change (as a new rare token's do), the
    VAE stays frozen, and optionally (``--ema``) an EMA UNet is added. The trained copy is then
    dehydrated losslessly and at each ``--ranks`` R, and every file is rehydrated again. For
    each it reports

    * the file size (and its share of the 4.3 GB trained folder), the bytes per sub-model;
    * wall time and peak RSS (``VmHWM`` of ``/proc/self/status``) of a fresh process doing
      only that one call (its ~0.5 GB of imports included; "over imports" subtracts the peak
      before the call);
    * the reconstruction error that ``dehydrate`` returns: relative Frobenius error of the
      fine-tuning change, per sub-model and overall, and relative to the weights;
    * for lossless files, whether rehydrate verified every file byte-identical (SHA-256).

    The error figures describe this synthetic change only: a real fine-tune's spectrum decides
    its own. Nothing is asserted. Timings are wall-clock on a machine that may be shared: the
    load average is printed.

Usage
    .venv/bin/python benchmarks/dehydrate_size.py                  # lossless + rank 128
    .venv/bin/python benchmarks/dehydrate_size.py --ranks 32 128 256 --ema --threads 1
    Needs ~20 GB of free disk in --work (default: a temporary folder, removed afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

# diffusers' published SD 1.5 configs, used if models/single_file/configs/sd1.json is absent
SD1_FALLBACK = {
    "unet": {"act_fn": "silu", "attention_head_dim": 8,
             "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
             "cross_attention_dim": 768,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
             "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-5,
             "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3},
    "vae": {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
            "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
            "up_block_types": ["UpDecoderBlock2D"] * 4},
    "text_encoder": {"hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
                     "max_position_embeddings": 77, "num_attention_heads": 12,
                     "num_hidden_layers": 12, "projection_dim": 768, "vocab_size": 49408,
                     "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407},
    "scheduler": {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1},
}


def sd1_configs() -> dict:
    path = REPO / "colab_dreambooth" / "models" / "single_file" / "configs" / "sd1.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return SD1_FALLBACK


def _clean(config: dict) -> dict:
    return {k: v for k, v in config.items()
            if not k.startswith("_") and k not in ("architectures", "model_type")}


def build_base(folder: Path) -> None:
    """Save an SD 1.5-shaped pipeline with random (seeded) fp32 weights to ``folder``."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from colab_dreambooth.models.tiny import clip_tokenizer

    configs = sd1_configs()
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**_clean(configs["unet"])),
        vae=AutoencoderKL(**_clean(configs["vae"])),
        text_encoder=CLIPTextModel(CLIPTextConfig(**_clean(configs["text_encoder"]))),
        tokenizer=clip_tokenizer(),
        scheduler=PNDMScheduler.from_config(configs["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)


def change(t, g, scale: float, noise_share: float):
    """A fine-tuning-like change of ``t``: decaying low-rank part + noise, RMS ``scale``."""
    import torch

    if t.ndim < 2:
        return torch.randn(t.shape, generator=g) * scale
    m = t.shape[0]
    n = t.numel() // m
    r = min(32, m, n)
    weights = 1.0 / torch.arange(1, r + 1, dtype=torch.float32)  # singular values ~ 1/i
    low = (torch.randn(m, r, generator=g) * weights) @ torch.randn(r, n, generator=g)
    low *= scale * (1 - noise_share) ** 0.5 / low.pow(2).mean().sqrt()
    noise = torch.randn(m, n, generator=g) * scale * noise_share ** 0.5
    return (low + noise).reshape(t.shape)


def make_trained(base: Path, target: Path, *, ema: bool, noise_share: float) -> None:
    """Copy ``base`` and change its UNet (and EMA copy) and text encoder as training would."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, target)
    g = torch.Generator().manual_seed(1)
    unet_file = target / "unet" / "diffusion_pytorch_model.safetensors"
    unet = load_file(unet_file)
    for name, t in unet.items():
        t += change(t, g, 5e-4, noise_share)
    save_file(unet, unet_file, metadata={"format": "pt"})
    if ema:
        (target / "unet_ema").mkdir()
        shutil.copy(target / "unet" / "config.json", target / "unet_ema" / "config.json")
        for name, t in unet.items():  # the EMA lags behind: a smaller change of its own
            t -= change(t, g, 2e-4, noise_share)
        save_file(unet, target / "unet_ema" / "diffusion_pytorch_model.safetensors",
                  metadata={"format": "pt"})
    del unet
    text_file = target / "text_encoder" / "model.safetensors"
    text = load_file(text_file)
    for name, t in text.items():
        if "token_embedding" in name:
            t[[42, 4242]] += torch.randn(2, t.shape[1], generator=g) * 1e-2
        elif "position_ids" not in name and t.is_floating_point():
            t += change(t, g, 5e-4, noise_share)
    save_file(text, text_file, metadata={"format": "pt"})
    (target / "training_info.json").write_text(json.dumps({"base_model": str(base), "steps": 0}))


def peak_rss_kib() -> int:
    """This process's peak resident memory. VmHWM, unlike ru_maxrss, is not inherited from
    the parent across exec (the parent holds the 4 GB models it built)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_one(args: argparse.Namespace) -> dict:
    """Dehydrate or rehydrate once in this process; return the figures."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch

    from colab_dreambooth.models.single_file.dehydrate import dehydrate
    from colab_dreambooth.models.single_file.rehydrate import rehydrate

    if args.threads:
        torch.set_num_threads(args.threads)
    before = peak_rss_kib()
    start = time.perf_counter()
    if args.one == "dehydrate":
        result = dehydrate(args.model, str(args.base), args.out, rank=args.rank, progress=False)
        figures = {"file_bytes": result.file_bytes, "model_bytes": result.model_bytes,
                   "stored_bytes": result.stored_bytes, "files_bytes": result.files_bytes,
                   "errors": result.errors, "weight_errors": result.weight_errors}
    else:
        result = rehydrate(args.model, str(args.base), args.out, progress=False)
        figures = {"verified": result.verified, "bytes_written": result.bytes_written}
    seconds = time.perf_counter() - start
    peak = peak_rss_kib()
    return {**figures, "seconds": seconds, "peak_rss_mib": peak / 1024,
            "over_imports_mib": (peak - before) / 1024, "threads": torch.get_num_threads()}


def child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"child {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="*", default=[128],
                        help="low-rank ranks to try (default: 128, the default rank)")
    parser.add_argument("--skip-lossless", action="store_true", help="only the low-rank runs")
    parser.add_argument("--ema", action="store_true", help="also save an EMA UNet (unet_ema/)")
    parser.add_argument("--noise-share", type=float, default=0.1,
                        help="share of the change's energy that is i.i.d. noise (default 0.1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads in each call (default: torch's own choice; "
                             "1 is faster on a machine whose cores are busy with other work)")
    parser.add_argument("--work", type=Path, default=None,
                        help="working folder (default: temp); the models built in it are "
                             "reused by later runs")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    # Internal: one dehydrate/rehydrate call in this process, printed as a RESULT line.
    parser.add_argument("--one", choices=["dehydrate", "rehydrate"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return 0

    work = args.work or Path(tempfile.mkdtemp(prefix="dehydrate-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"Working in {work}; load average {os.getloadavg()}")
    try:
        t = time.perf_counter()
        if not (work / "base" / "model_index.json").is_file():
            build_base(work / "base")
        if not (work / "trained" / "model_index.json").is_file():
            make_trained(work / "base", work / "trained", ema=args.ema,
                         noise_share=args.noise_share)
        print(f"Base and trained SD 1.5-shaped folders ready ({time.perf_counter() - t:.0f} s)")
        rows = []
        for rank in ([] if args.skip_lossless else [None]) + list(args.ranks):
            label = "lossless" if rank is None else f"rank {rank}"
            file = work / f"{label.replace(' ', '')}.safetensors"
            file.unlink(missing_ok=True)
            threads = ["--threads", str(args.threads)] if args.threads else []
            extra = threads + ([] if rank is None else ["--rank", str(rank)])
            d = child(["--one", "dehydrate", "--model", str(work / "trained"), "--base",
                       str(work / "base"), "--out", str(file), *extra])
            out = work / f"rebuilt-{label.replace(' ', '')}"
            shutil.rmtree(out, ignore_errors=True)
            r = child(["--one", "rehydrate", "--model", str(file), "--base", str(work / "base"),
                       "--out", str(out), *threads])
            shutil.rmtree(out, ignore_errors=True)
            if not args.keep:
                file.unlink(missing_ok=True)
            rows.append({"mode": label, "dehydrate": d, "rehydrate": r})
            print_row(label, d, r)
        print(f"Load average at the end {os.getloadavg()}")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def print_row(label: str, d: dict, r: dict) -> None:
    share = d["file_bytes"] / d["model_bytes"]
    print(f"\n== {label}: {_mb(d['file_bytes'])} ({share:.1%} of the {_mb(d['model_bytes'])} "
          "trained folder)")
    print(f"   torch threads {d['threads']}")
    print(f"   dehydrate {d['seconds']:7.1f} s, peak RSS {d['peak_rss_mib']:7.0f} MiB "
          f"({d['over_imports_mib']:.0f} over imports)")
    print(f"   rehydrate {r['seconds']:7.1f} s, peak RSS {r['peak_rss_mib']:7.0f} MiB "
          f"({r['over_imports_mib']:.0f} over imports)"
          + ("; every file byte-identical (SHA-256)" if r["verified"] else ""))
    for sub, size in d["stored_bytes"].items():
        print(f"   {sub:14} {_mb(size):>12}   error {d['errors'].get(sub, 0):7.2%} of the change"
              f" ({d['weight_errors'].get(sub, 0):.4%} of the weights)")
    print(f"   {'other files':14} {_mb(d['files_bytes']):>12}")
    print(f"   overall error {d['errors']['overall']:.2%} of the change, "
          f"{d['weight_errors']['overall']:.4%} of the weights")


if __name__ == "__main__":
    sys.exit(main())
