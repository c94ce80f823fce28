"""Training speed and peak memory of the tiny built-in model on the CPU.

What it measures
    For a few training configurations (resolution 64 / 128, cached latents or a VAE pass every
    step, text encoder trained or frozen, batch size 1 / 2, torch's default thread count or a
    single thread) it trains the tiny Stable-Diffusion-shaped model on the demo data (6
    instance + 12 class images, prior preservation on, as in ``colab-dreambooth demo``) with
    :func:`colab_dreambooth.training.train.train` and reports

    * steps/s and s/step: from the timestamps of the ``on_step`` callback, over the steps after
      ``--warmup`` warm-up steps, so model loading, latent caching, the first (slow) steps and
      the final save are all excluded; "median" is the median step time;
    * images/s: steps/s times the images each step trains on (batch size instance images plus
      as many class images, since prior preservation is on);
    * the one-off costs, apart from the steps: "1st step s", seconds from calling ``train()``
      to the end of the first step (config checks, model load, latent caching, first step),
      and "save s", seconds from the last step's end to ``train()``'s return (the final
      checkpoint and the model);
    * peak RSS: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of a fresh Python process that
      runs only that configuration, so each figure is that configuration's own peak. It
      includes the ~370 MiB of torch/diffusers/transformers the process imports; "over
      imports" subtracts the peak reached before ``train()`` was called.

How
    The parent draws the demo data once into a temporary folder, then runs this same script
    once per configuration (``--repeat`` times) with the hidden ``--one`` option; the child
    trains and prints one ``RESULT {json}`` line that the parent collects into a table.
    Timings are wall-clock. The load average is printed before and after: on a machine that
    other jobs keep busy, torch's default of one thread per core makes this tiny model's many
    small ops wait on each other (OpenMP barriers) and runs up to 10-25x slower than one
    thread, so compare ``--threads 1`` figures there. Nothing is asserted.

Usage
    .venv/bin/python benchmarks/cpu_tiny.py                    # all configurations, 20 steps each
    .venv/bin/python benchmarks/cpu_tiny.py --threads 1 --repeat 3   # on a busy machine
    .venv/bin/python benchmarks/cpu_tiny.py --steps 40 --configs r64-b1 r128-b1
    .venv/bin/python benchmarks/cpu_tiny.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

# name -> (description, changes to demo_config)
CONFIGS: dict[str, tuple[str, dict]] = {
    "r64-b1": ("64 px, batch 1, cached latents, TE trained",
               dict(resolution=64, train_batch_size=1)),
    "r64-b2": ("64 px, batch 2", dict(resolution=64, train_batch_size=2)),
    "r64-b1-te-frozen": ("64 px, batch 1, text encoder frozen",
                         dict(resolution=64, train_batch_size=1, train_text_encoder=False)),
    "r64-b1-no-cache": ("64 px, batch 1, VAE encode every step",
                        dict(resolution=64, train_batch_size=1, cache_latents=False)),
    "r128-b1": ("128 px, batch 1", dict(resolution=128, train_batch_size=1)),
    "r128-b1-no-cache": ("128 px, batch 1, VAE encode every step",
                         dict(resolution=128, train_batch_size=1, cache_latents=False)),
    "r64-b1-1thread": ("64 px, batch 1, torch.set_num_threads(1)",
                       dict(resolution=64, train_batch_size=1, threads=1)),
}


def run_one(name: str, data_root: Path, out_root: Path, steps: int, warmup: int,
            threads: int | None) -> dict:
    """Train configuration ``name`` in this process and return its figures."""
    import logging
    import resource
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch

    changes = dict(CONFIGS[name][1])
    threads = changes.pop("threads", threads)
    if threads:
        torch.set_num_threads(threads)
    import accelerate  # noqa: F401  (imported here so "over imports" is training alone)
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    from colab_dreambooth.demo import demo_config
    from colab_dreambooth.models.tiny import tiny_model_path
    from colab_dreambooth.training.train import train

    tiny_model_path()  # built once into the user cache; not part of the timing
    config = demo_config(data_root, steps=warmup + steps, resolution=changes.pop("resolution"))
    config = config.copy(models_root=str(out_root), model_name=name, **changes)
    rows_per_step = config.train_batch_size * (
        2 if config.concepts_list[0].wants_prior_preservation else 1)

    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    stamps: list[float] = []
    started = time.perf_counter()
    result = train(config, progress=False, on_step=lambda *_: stamps.append(time.perf_counter()))
    total = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    timed = stamps[warmup - 1:] if warmup > 0 else [started] + stamps
    gaps = [b - a for a, b in zip(timed, timed[1:])]
    measured = len(gaps)
    span = timed[-1] - timed[0]
    gaps.sort()
    return {
        "name": name, "description": CONFIGS[name][0], "resolution": config.resolution,
        "batch": config.train_batch_size, "rows_per_step": rows_per_step,
        # Blank (auto) is on for both on the CPU preset.
        "cache_latents": config.cache_latents is not False,
        "train_text_encoder": config.train_text_encoder is not False,
        "threads": torch.get_num_threads(), "steps_done": result.steps,
        "measured_steps": measured, "steps_per_s": measured / span,
        "s_per_step": span / measured, "median_s_per_step": gaps[len(gaps) // 2],
        "images_per_s": measured * rows_per_step / span,
        "first_step_s": stamps[0] - started, "total_s": total,
        # One-off cost after the loop: the final checkpoint and the model (or LoRA file).
        "save_s": started + total - stamps[-1],
        "peak_rss_mib": peak_kib / 1024, "rss_before_train_mib": rss_before_kib / 1024,
        "final_loss": result.losses[-1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20,
                        help="measured steps per configuration, after the warm-up (default 20)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="steps run before timing starts (default 3)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                        metavar="NAME", help="configurations to run (default: all; see --list)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads in each run (default: torch's own choice, "
                             "here one per core); r64-b1-1thread always uses 1")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each configuration this many times (a fresh process each) and "
                             "keep the fastest run, the one other jobs disturbed least "
                             "(default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary data and model folders (path printed)")
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    # Internal: run one configuration in this process and print a RESULT line.
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeat < 1:
        parser.error("--steps and --repeat must be >= 1 and --warmup >= 0")

    if args.list:
        for name, (description, _) in CONFIGS.items():
            print(f"{name:18s} {description}")
        return 0
    if args.one:
        figures = run_one(args.one, args.data, args.out, args.steps, args.warmup, args.threads)
        print("RESULT " + json.dumps(figures), flush=True)
        return 0

    import torch

    from colab_dreambooth.demo import make_demo_data
    from colab_dreambooth.models.tiny import tiny_model_path

    tmp = Path(tempfile.mkdtemp(prefix="cpu-tiny-bench-"))
    make_demo_data(tmp / "data")
    tiny_model_path()  # build the tiny model once, outside every timed child
    print(f"cpu_tiny: {len(args.configs)} configuration(s), {args.warmup} warm-up + "
          f"{args.steps} measured steps each; torch {torch.__version__}, "
          f"{os.cpu_count()} CPU(s), {platform.processor() or platform.machine()}")
    print(f"load average before: {_load()}" + (f"; best of {args.repeat} runs kept"
                                                if args.repeat > 1 else ""))
    results = []
    try:
        for name in args.configs:
            runs = []
            for _ in range(args.repeat):
                command = [sys.executable, str(Path(__file__).resolve()), "--one", name,
                           "--data", str(tmp), "--out", str(tmp / "models"),
                           "--steps", str(args.steps), "--warmup", str(args.warmup)]
                if args.threads:
                    command += ["--threads", str(args.threads)]
                started = time.perf_counter()
                proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
                line = next((l for l in reversed(proc.stdout.splitlines())
                             if l.startswith("RESULT ")), None)
                if proc.returncode or line is None:
                    print(f"{name}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}",
                          file=sys.stderr)
                    break
                figures = json.loads(line[len("RESULT "):])
                runs.append(figures)
                print(f"  {name:18s} {figures['steps_per_s']:.2f} steps/s, "
                      f"peak {figures['peak_rss_mib']:.0f} MiB "
                      f"({time.perf_counter() - started:.0f} s with start-up)", flush=True)
            else:
                best = max(runs, key=lambda r: r["steps_per_s"])
                best["all_steps_per_s"] = [r["steps_per_s"] for r in runs]
                results.append(best)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average after:  {_load()}\n")
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0 if len(results) == len(args.configs) else 1


def print_table(results: list[dict]) -> None:
    header = ("config", "res", "batch", "img/step", "latents", "TE", "thr", "steps/s", "s/step",
              "median", "img/s", "1st step s", "save s", "peak MiB", "over imports")
    rows = [(r["name"], r["resolution"], r["batch"], r["rows_per_step"],
             "cached" if r["cache_latents"] else "VAE", "train" if r["train_text_encoder"]
             else "frozen", r["threads"], f"{r['steps_per_s']:.2f}", f"{r['s_per_step']:.3f}",
             f"{r['median_s_per_step']:.3f}", f"{r['images_per_s']:.2f}",
             f"{r['first_step_s']:.1f}", f"{r['save_s']:.1f}", f"{r['peak_rss_mib']:.0f}",
             f"+{r['peak_rss_mib'] - r['rss_before_train_mib']:.0f}") for r in results]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(x).rjust(w) if i else str(x).ljust(w)
                        for i, (x, w) in enumerate(zip(row, widths))))
    print("\nimg/step counts the class images of prior preservation (batch x 2); s/step is the "
          "mean over the measured steps, median its median.")


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
