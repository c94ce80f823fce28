"""Language drift with and without prior preservation, on the tiny model (the DreamBooth paper's
claim, in miniature).

What it measures
    The demo subject (a drawn star, "a photo of zwx toy on a <colour> background") is trained
    twice from the same base model, same seed, steps and learning rates, text encoder trained:

    * with prior preservation: the demo configuration (12 class images, "a photo of a toy on a
      <colour> background", Prior Loss Weight ``--prior-loss-weight``);
    * without: class prompt and class folder blank, 0 class images.

    Each trained model and the base are then evaluated with the same fixed inputs: VAE latents
    (latent means) of images, noise from ``--noise-seeds`` seeded generators, and the timesteps
    ``--timesteps``; each model runs its own text encoder and UNet.

    * language drift (lower is better): mean squared difference between the trained model's and
      the base model's noise predictions, for class prompts "a photo of a toy on a <colour>
      background" on held-out toy latents (toys drawn with another seed, never trained on by any
      model). Prior preservation should keep this small;
    * class fit: denoising MSE (prediction vs the true noise) on the same held-out toys with their
      class prompts: does the model still denoise generic toys as well as the base did;
    * instance fit: denoising MSE on the 6 instance images' latents with their instance prompts
      ("a photo of zwx toy on a ..."): did it learn the subject.

    Every figure is averaged over all timesteps, noise seeds and images; the "+-" is the
    standard deviation over noise seeds (and training seeds when ``--train-seeds`` > 1, where
    the table shows the mean over training seeds).

The base model
    The raw tiny model is a poor stand-in for Stable Diffusion here, for two reasons, so by
    default the base is built from it first:

    1. Its VAE is random: every latent has a posterior std of about 1.0 while the latent means
       (the image content) spread only about 0.27, and SD's scaling factor 0.18215 then shrinks
       both. Trained on sampled latents, a model sees mostly the VAE's sampling noise, and the
       star and the toys are hard to tell apart. ``--vae sharp`` (default) sets the log-variance
       half of the VAE's ``quant_conv`` to a constant (std 1e-3) and the scaling factor to one
       over the spread of the toys' latent means, so latents have about unit spread and little
       sampling noise, as SD's do. ``--vae raw`` keeps the tiny VAE.
    2. Its UNet and text encoder are random: there is no class prior to preserve, and its noise
       predictions are no better than predicting zero. Every fine-tuned model then moves far
       from it, and the prior-preservation run, which also learns the toys, moves class prompts
       further from those random predictions: with ``--vae raw --pretrain-steps 0`` this
       benchmark shows *more* drift with prior preservation (see benchmarks/README.md). By
       default the base is the tiny model pre-trained for ``--pretrain-steps`` steps (cosine
       schedule) on ``--pretrain-images`` toys drawn like the demo's class images, with their
       captions "a photo of a toy on a <colour> background" and no instance token.

    The class images the prior-preservation run trains on are the demo's 12 drawn toys, which
    stand in for the samples of the base model that the paper uses. The held-out toys, the
    pre-training toys and the demo's class images are three different draws.

Usage
    .venv/bin/python benchmarks/prior_drift.py                    # defaults, about 5 minutes
    .venv/bin/python benchmarks/prior_drift.py --train-seeds 3    # average 3 training seeds
    .venv/bin/python benchmarks/prior_drift.py --vae raw --pretrain-steps 0   # the raw tiny base
    .venv/bin/python benchmarks/prior_drift.py --keep             # then reuse its base with
        --base <printed folder>/dreambooth/base/model             # (skips pre-training)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--steps", type=int, default=400, help="fine-tuning steps of each run (default 400)")
    add("--learning-rate", type=float, default=1e-3, help="UNet learning rate (default 1e-3)")
    add("--text-encoder-learning-rate", type=float, default=5e-4,
        help="text encoder learning rate (default 5e-4)")
    add("--prior-loss-weight", type=float, default=1.0, help="Prior Loss Weight (default 1.0)")
    add("--batch-size", type=int, default=1, help="instance images per step (default 1)")
    add("--resolution", type=int, default=64, help="training resolution (default 64)")
    add("--seed", type=int, default=1234, help="training seed of the first run (default 1234)")
    add("--train-seeds", type=int, default=1,
        help="train each variant with this many seeds (seed, seed+1, ...) and average "
             "(default 1)")
    add("--pretrain-steps", type=int, default=800,
        help="steps of pre-training the tiny model on toy images to make the base; 0 = the "
             "tiny model's random UNet and text encoder are the base (default 800)")
    add("--base", default=None,
        help="use this base model instead of pre-training one: 'tiny' or a diffusers folder "
             "(e.g. a base kept by an earlier --keep run: <tmp>/dreambooth/base/model)")
    add("--vae", choices=("sharp", "raw"), default="sharp",
        help="sharp: give the tiny model's VAE a small posterior std and unit-spread latents "
             "before pre-training (default); raw: keep the tiny VAE as it is")
    add("--pretrain-images", type=int, default=36, help="toy images to pre-train on (default 36)")
    add("--heldout-images", type=int, default=12,
        help="held-out toy images the drift is measured on (default 12)")
    add("--timesteps", type=int, nargs="+", default=[50, 200, 400, 600, 800, 950],
        help="timesteps evaluated (default 50 200 400 600 800 950)")
    add("--noise-seeds", type=int, default=4, help="noise draws evaluated (default 4)")
    add("--threads", type=int, default=1,
        help="torch.set_num_threads; 0 = torch's own choice (default 1: on 2 cores that other "
             "jobs keep busy, 2 threads run this tiny model up to 10x slower than 1)")
    add("--json", type=Path, default=None, help="also write the figures here")
    add("--keep", action="store_true", help="keep the temporary folder (path printed)")
    add("--verbose", action="store_true", help="show training progress bars and warnings")
    args = parser.parse_args(argv)
    if min(args.steps, args.train_seeds, args.noise_seeds, args.heldout_images) < 1:
        parser.error("--steps, --train-seeds, --noise-seeds and --heldout-images must be >= 1")
    return args


# ----------------------------------------------------------------------------- training
def pretrain_base(args, root: Path) -> str:
    """The base model: the tiny model (its VAE made sharp unless ``--vae raw``), pre-trained
    on toy images with their captions (no instance token anywhere) unless
    ``--pretrain-steps 0``."""
    from colab_dreambooth.config.concept import Concept
    from colab_dreambooth.demo import demo_config, make_demo_data
    from colab_dreambooth.training.train import train

    if args.base:
        return args.base
    _, toys = make_demo_data(root / "pretrain", instance_images=0,
                             class_images=args.pretrain_images, seed=101)
    start = "tiny" if args.vae == "raw" else sharpen_tiny_vae(root / "tiny-sharp", toys,
                                                              args.resolution)
    if args.pretrain_steps == 0:
        return start
    config = demo_config(root, steps=args.pretrain_steps, resolution=args.resolution).copy(
        # A cosine decay to 0 leaves the base settled rather than mid-step at a high rate.
        pretrained_model_name_or_path=start, model_name="base", train_batch_size=2,
        seed=args.seed + 1000, lr_scheduler="cosine", lr_warmup_steps=10,
        concepts_list=[Concept(
            instance_prompt="[filewords]", instance_data_dir=str(toys),
            # The captions are used as they are: no instance token, no class prior.
            file_prompt_contents="Instance Token + Class Token + Description")])
    result = _train(train, config, args, "pre-training the base on toys")
    return str(result.model_dir)


def sharpen_tiny_vae(folder: Path, images_dir: Path, resolution: int) -> str:
    """The tiny model with a near-deterministic VAE whose latents have unit spread.

    The tiny model's random VAE gives every latent a posterior std of about 1.0 while the
    latent means (the image content) spread only about 0.27, and its scaling factor (SD's
    0.18215) shrinks them further: trained on sampled latents, a model sees mostly the VAE's
    sampling noise. Here the log-variance half of ``quant_conv`` is set to a constant (std
    1e-3) and the scaling factor to 1 / (std of the latent means of ``images_dir``), as SD's
    VAE gives latents of about unit spread and small posterior std.
    """
    import math

    import torch

    from colab_dreambooth.models.loading import load_components
    from colab_dreambooth.models.pipelines import pipeline_from_components

    parts = load_components("tiny")
    vae = parts.vae
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:] = 0.0
        vae.quant_conv.bias[channels:] = 2 * math.log(1e-3)
        mean = image_latents(parts, sorted(images_dir.glob("*.png")), resolution, scaled=False)
    vae.register_to_config(scaling_factor=round(1.0 / mean.std().item(), 5))
    pipeline_from_components(parts).save_pretrained(folder)
    return str(folder)


def fine_tune(args, root: Path, base: str, prior: bool, seed: int):
    from colab_dreambooth.demo import demo_config
    from colab_dreambooth.training.train import train

    config = demo_config(root, steps=args.steps, resolution=args.resolution).copy(
        pretrained_model_name_or_path=base, model_name=f"{'with' if prior else 'without'}-prior"
        f"-{seed}", learning_rate=args.learning_rate, train_text_encoder=True,
        text_encoder_learning_rate=args.text_encoder_learning_rate, seed=seed,
        prior_loss_weight=args.prior_loss_weight, train_batch_size=args.batch_size)
    if not prior:
        concept = config.concepts_list[0]
        config = config.copy(concepts_list=[dataclasses.replace(
            concept, class_prompt="", class_data_dir="", num_class_images=0)])
    label = f"seed {seed}, {'with' if prior else 'without'} prior preservation"
    return _train(train, config, args, label)


def _train(train, config, args, label: str):
    started = time.perf_counter()
    result = train(config, progress=args.verbose)
    tail = result.losses[-20:]
    print(f"  {label}: {result.steps} steps in {time.perf_counter() - started:.0f} s, loss "
          f"{result.losses[0]:.3f} -> {sum(tail) / len(tail):.3f} (mean of the last "
          f"{len(tail)})", flush=True)
    return result


# ----------------------------------------------------------------------------- evaluation
def image_latents(parts, images: list[Path], resolution: int, scaled: bool = True):
    """VAE latent means of ``images`` (centre-cropped; scaled as for the UNet), as one batch."""
    import torch

    from colab_dreambooth.data.images import crop_and_resize, load_image, to_tensor

    pixels = torch.stack([to_tensor(crop_and_resize(load_image(p), resolution, True))
                          for p in images])
    with torch.no_grad():
        mean = parts.vae.encode(pixels).latent_dist.mean
    return mean * parts.vae.config.scaling_factor if scaled else mean


def predictions(parts, latents, prompts: list[str], timesteps: list[int], noise_seeds: int):
    """Noise predictions [seed, timestep, image, ...] and the noise itself, for fixed inputs."""
    import torch

    from colab_dreambooth.models.text_encoding import encode_prompts

    parts.unet.eval()
    parts.text_encoder.eval()
    n = latents.shape[0]
    preds, noises = [], []
    with torch.no_grad():
        states = encode_prompts(parts.tokenizer, parts.text_encoder, prompts, pad_tokens=True)
        for seed in range(noise_seeds):
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
            row = []
            for t in timesteps:
                tt = torch.full((n,), t, dtype=torch.long)
                noisy = parts.noise_scheduler.add_noise(latents, noise, tt)
                row.append(parts.unet(noisy, tt, states).sample)
            preds.append(torch.stack(row))
            noises.append(noise)
    return torch.stack(preds), torch.stack(noises)[:, None].expand(-1, len(timesteps), -1, -1,
                                                                     -1, -1)


def per_seed_mse(a, b) -> list[float]:
    """MSE between two [seed, ...] tensors, one figure per noise seed."""
    return (a - b).pow(2).flatten(1).mean(1).tolist()


def evaluate(model: str, base_preds, heldout, instance, args) -> dict:
    """The three figures of one model (per noise seed), against the base's predictions."""
    from colab_dreambooth.models.loading import load_components

    parts = load_components(model)
    class_pred, class_noise = predictions(parts, heldout["latents"], heldout["prompts"],
                                          args.timesteps, args.noise_seeds)
    inst_pred, inst_noise = predictions(parts, instance["latents"], instance["prompts"],
                                        args.timesteps, args.noise_seeds)
    return {"drift": per_seed_mse(class_pred, base_preds),
            "class_fit": per_seed_mse(class_pred, class_noise),
            "instance_fit": per_seed_mse(inst_pred, inst_noise),
            "by_timestep_drift": (class_pred - base_preds).pow(2).transpose(0, 1).flatten(1)
            .mean(1).tolist()}


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import logging
    import warnings

    if not args.verbose:
        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from colab_dreambooth.data.captions import read_caption
    from colab_dreambooth.data.dataset import collect_training_data
    from colab_dreambooth.demo import demo_config, make_demo_data
    from colab_dreambooth.models.loading import load_components

    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="prior-drift-"))
    print(f"prior_drift: {args.steps} steps, lr {args.learning_rate:g} (text encoder "
          f"{args.text_encoder_learning_rate:g}), Prior Loss Weight {args.prior_loss_weight:g}, "
          f"batch {args.batch_size}, {args.resolution} px, training seed(s) "
          f"{args.seed}..{args.seed + args.train_seeds - 1}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("base: " + (args.base if args.base else
                      f"tiny model, {args.vae} VAE, " + (
                          f"pre-trained {args.pretrain_steps} steps on {args.pretrain_images} toys"
                          if args.pretrain_steps else "not pre-trained (random UNet and text "
                                                       "encoder)")), flush=True)
    try:
        make_demo_data(root / "data")
        _, heldout_dir = make_demo_data(root / "heldout", instance_images=0,
                                        class_images=args.heldout_images, seed=202)
        base = pretrain_base(args, root)
        runs = {"without prior": [], "with prior": []}
        for k in range(args.train_seeds):
            for prior, key in ((False, "without prior"), (True, "with prior")):
                runs[key].append(fine_tune(args, root, base, prior, args.seed + k).model_dir)

        # Fixed evaluation inputs: held-out toys with class prompts, instances with theirs.
        base_parts = load_components(base)
        heldout_images = sorted(heldout_dir.glob("*.png"))
        heldout = {"latents": image_latents(base_parts, heldout_images, args.resolution),
                   "prompts": [read_caption(p) for p in heldout_images]}
        data = collect_training_data(demo_config(root, resolution=args.resolution))
        instance = {"latents": image_latents(base_parts, [e.image for e in data.instance],
                                             args.resolution),
                    "prompts": [e.prompt for e in data.instance]}
        base_preds, _ = predictions(base_parts, heldout["latents"], heldout["prompts"],
                                    args.timesteps, args.noise_seeds)
        figures = {"base": [evaluate(base, base_preds, heldout, instance, args)]}
        for key, dirs in runs.items():
            figures[key] = [evaluate(str(d), base_preds, heldout, instance, args) for d in dirs]
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\nheld-out toys: {len(heldout['prompts'])} images, prompts like "
          f"'{heldout['prompts'][0]}'; instance prompts like '{instance['prompts'][0]}'")
    print(f"averaged over timesteps {args.timesteps} x {args.noise_seeds} noise seeds"
          + (f" x {args.train_seeds} training seeds" if args.train_seeds > 1 else "")
          + "; +- = standard deviation over seeds\n")
    summary = print_table(figures)
    drift_with, drift_without = summary["with prior"]["drift"], summary["without prior"]["drift"]
    print(f"\ndrift ratio with / without prior preservation: {drift_with / drift_without:.3f}"
          f"  ({'less' if drift_with < drift_without else 'MORE'} drift with prior preservation)")
    if args.train_seeds > 1:
        print("per training seed: " + ", ".join(
            f"seed {args.seed + k}: {statistics.fmean(w['drift']):.4f} / "
            f"{statistics.fmean(wo['drift']):.4f} = "
            f"{statistics.fmean(w['drift']) / statistics.fmean(wo['drift']):.3f}"
            for k, (w, wo) in enumerate(zip(figures["with prior"], figures["without prior"]))))
    print("drift by timestep (without / with):  " + ", ".join(
        f"t={t}: {a:.3f}/{b:.3f}" for t, a, b in zip(
            args.timesteps, _mean_lists([f["by_timestep_drift"] for f in figures["without prior"]]),
            _mean_lists([f["by_timestep_drift"] for f in figures["with prior"]]))))
    print(f"\nfinished in {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v
                                                  for k, v in vars(args).items()},
                                         "figures": figures, "summary": summary}, indent=2),
                             encoding="utf-8")
    return 0


def print_table(figures: dict) -> dict:
    names = {"drift": "language drift", "class_fit": "class fit (held-out toys)",
             "instance_fit": "instance fit (zwx)"}
    summary = {}
    for model, evals in figures.items():
        summary[model] = {}
        for metric in names:
            values = [v for e in evals for v in e[metric]]
            summary[model][metric] = statistics.fmean(values)
            summary[model][metric + "_sd"] = statistics.pstdev(values)
    header = ["model", *names.values()]
    rows = [[model] + [f"{s[m]:.4f} +- {s[m + '_sd']:.4f}" for m in names]
            for model, s in summary.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(x.ljust(w) if i == 0 else x.rjust(w)
                        for i, (x, w) in enumerate(zip(row, widths))))
    print("(all lower is better; drift of the base against itself is 0 by definition)")
    return summary


def _mean_lists(lists: list[list[float]]) -> list[float]:
    return [statistics.fmean(column) for column in zip(*lists)]


if __name__ == "__main__":
    sys.exit(main())
