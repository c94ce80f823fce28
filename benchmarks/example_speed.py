"""Per-step training speed: ours against diffusers' DreamBooth example, same tiny model and data.

What it measures
    Both trainers fine-tune the same tiny Stable-Diffusion-shaped model (written by
    :func:`colab_dreambooth.models.tiny.build_tiny_model` into a temporary folder) on the same
    demo images (:func:`colab_dreambooth.demo.make_demo_data`: 6 instance + 12 class images,
    captions removed, since the example reads every file in its folders as an image) with the
    same settings: one resolution (64 px by default), batch 1, prior preservation (so 2 rows per
    step), text encoder trained, one learning rate (1e-3) constant without warm-up, AdamW, fp32,
    centre crop, no flip, seed 1234, no checkpoint or sample before the end, one CPU thread
    (``OMP_NUM_THREADS``/``MKL_NUM_THREADS=1`` and ``torch.set_num_threads(1)`` in each child).
    Sides: ``example`` (the script with its own command-line options), ``ours``
    (:func:`colab_dreambooth.training.train.train`, cached latents as our CPU default) and
    ``ours-vae`` (``cache_latents=False``: the VAE encodes every step, as in the example).

    Each side runs N and 2N steps, each in a fresh process timed from start to exit, so
    per step = (T(2N) - T(N)) / N holds no one-off cost (imports, model load, latent caching,
    the final save, our end-of-run checkpoint), and one-off = T(N) - N * per step.
    ``--repeat k`` takes the fastest of k runs of each (runs interleaved across sides, so a
    change in the machine's load hits all of them). Two tables: wall time, and the children's
    CPU time (user + system, from ``getrusage(RUSAGE_CHILDREN)``), which other jobs on a
    shared machine disturb much less than wall time with one thread per child (they still
    share caches and memory bandwidth). On a busy machine the one-off costs (15-40 s) swing by
    as much as 100 steps take, so a third figure times the steps from inside each child: the
    mean step after 5 warm-up steps, from the example's progress-bar updates (one per
    optimizer step; the launcher wraps ``tqdm.auto.tqdm.update``) and our ``on_step``
    callback, fastest run kept. Ratio = example s/step / side s/step (above
    1: that side is faster). Nothing is asserted; the load average is printed before and after.

Getting the example (not part of this repository)
    Download ``examples/dreambooth/train_dreambooth.py`` of the diffusers release you have
    installed (``python -c "import diffusers; print(diffusers.__version__)"``), e.g. for 0.40.0::

        curl -LO https://raw.githubusercontent.com/huggingface/diffusers/v0.40.0/examples/dreambooth/train_dreambooth.py

    (``main`` instead of ``v0.40.0`` for the newest). The script starts with
    ``check_min_version("X.Y.Z.dev0")``, which fails unless the installed diffusers is at
    least X.Y.Z.dev0; this harness then neutralises ``diffusers.utils.check_min_version`` in the
    example's process (which starts through a small launcher in a temporary folder that sets
    the thread count, then runs the script as ``__main__``) and says so. Too old a copy
    may not run on a newer diffusers at all; use the copy of your release's tag.
    The example imports ``torchvision.transforms``; when torchvision cannot be imported here
    (a CPU torch with a CUDA torchvision, or none), the example gets a stand-in with just the
    transforms it uses (``benchmarks/_torchvision_shim.py``), put on its path only after
    transformers and diffusers have noted that torchvision is absent (else they would import
    parts of it the stand-in lacks), and the output says so.

Usage
    .venv/bin/python benchmarks/example_speed.py --example /path/to/train_dreambooth.py
    .venv/bin/python benchmarks/example_speed.py --example E.py --steps 50 --repeat 2
    .venv/bin/python benchmarks/example_speed.py --example E.py --repo ../other-checkout
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The checkout whose colab_dreambooth the "ours" children import (--repo); this one otherwise.
CODE = Path(os.environ.get("EXAMPLE_SPEED_CODE", REPO))
if str(CODE) not in sys.path:
    sys.path.insert(0, str(CODE))

SIDES = ("example", "ours", "ours-vae")
WARMUP = 5  # steps left out of the in-process step timing
INSTANCE_PROMPT, CLASS_PROMPT = "a photo of zwx toy", "a photo of a toy"
LEARNING_RATE, SEED = 1e-3, 1234


def run_ours(root: Path, steps: int, resolution: int, cache_latents: bool,
             threads: int) -> None:
    """Train our side in this process (the child): the demo config with the shared settings."""
    import logging
    import warnings

    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from colab_dreambooth.demo import demo_config
    from colab_dreambooth.training.train import train

    config = demo_config(root, steps=steps, resolution=resolution)
    concept = dataclasses.replace(
        config.concepts_list[0], instance_prompt=INSTANCE_PROMPT, class_prompt=CLASS_PROMPT,
        num_class_images=12, n_save_sample=0)
    config = config.copy(
        pretrained_model_name_or_path=str(root / "model"), models_root=str(root / "out-ours"),
        model_name=f"bench-{steps}", train_batch_size=1, learning_rate=LEARNING_RATE,
        text_encoder_learning_rate=LEARNING_RATE, lr_scheduler="constant", lr_warmup_steps=0,
        center_crop=True, hflip=False, seed=SEED, cache_latents=cache_latents,
        save_every_steps=0, concepts_list=[concept])
    stamps: list[float] = []
    result = train(config, progress=False, force=True,
                   on_step=lambda *_: stamps.append(time.perf_counter()))
    assert result.steps == steps, (result.steps, steps)
    Path(os.environ["EXAMPLE_SPEED_STAMPS"]).write_text(" ".join(map(repr, stamps)))


def example_command(example: Path, root: Path, steps: int, resolution: int) -> list[str]:
    """The example's command line with the shared settings."""
    return [
        sys.executable, str(root / "launch_example.py"), str(example),
        "--pretrained_model_name_or_path", str(root / "model"),
        "--instance_data_dir", str(root / "data" / "instance"),
        "--class_data_dir", str(root / "data" / "class"),
        "--instance_prompt", INSTANCE_PROMPT, "--class_prompt", CLASS_PROMPT,
        "--with_prior_preservation", "--prior_loss_weight", "1.0", "--num_class_images", "12",
        "--output_dir", str(root / "out-example"), "--seed", str(SEED),
        "--resolution", str(resolution), "--center_crop", "--train_text_encoder",
        "--train_batch_size", "1", "--max_train_steps", str(steps),
        "--checkpointing_steps", str(10 ** 9), "--learning_rate", str(LEARNING_RATE),
        "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--mixed_precision", "no",
        "--report_to", "all", "--dataloader_num_workers", "0"]


LAUNCHER = """\
# Runs the example as __main__ after setting up its process (written by example_speed.py).
import runpy
import sys

import torch

torch.set_num_threads({threads})
# transformers and diffusers note once, and cache, whether torchvision exists: before the
# stand-in joins the path, or they would import parts of torchvision it lacks.
import diffusers.utils
import transformers.utils.import_utils

transformers.utils.import_utils.is_torchvision_available()
if {patch_version}:
    diffusers.utils.check_min_version = lambda *args: None
if {shim!r}:
    sys.path.insert(0, {shim!r})
# One progress-bar update per optimizer step: its timestamps time the steps from inside.
import atexit
import os
import time

import tqdm.auto

stamps = []
update = tqdm.auto.tqdm.update


def stamped_update(self, n=1):
    if self.total == int(os.environ["EXAMPLE_SPEED_STEPS"]):  # the training bar only
        stamps.append(time.perf_counter())
    return update(self, n)


tqdm.auto.tqdm.update = stamped_update
atexit.register(lambda: open(os.environ["EXAMPLE_SPEED_STAMPS"], "w").write(
    " ".join(map(repr, stamps))))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def prepare(root: Path, example: Path | None, threads: int) -> list[str]:
    """Data, model and the example's launcher under ``root``; return notes to print."""
    from colab_dreambooth.demo import make_demo_data
    from colab_dreambooth.models.tiny import build_tiny_model

    notes = []
    make_demo_data(root / "data")
    for caption in (root / "data").rglob("*.txt"):
        caption.unlink()  # the example would open it as an image; prompts are fixed instead
    build_tiny_model(root / "model")
    if example is None:
        return notes
    patch_version = _needs_version_patch(example)
    if patch_version:
        notes.append("the example's check_min_version asks for a newer diffusers than the "
                     "installed one: neutralised in its process")
    shim = ""
    if not _imports("torchvision"):
        shim = str(root / "shim")
        (root / "shim" / "torchvision").mkdir(parents=True)
        (root / "shim" / "torchvision" / "__init__.py").write_text(
            "from . import transforms  # noqa: F401\n")
        shutil.copy(Path(__file__).with_name("_torchvision_shim.py"),
                    root / "shim" / "torchvision" / "transforms.py")
        notes.append("torchvision does not import here: the example gets a stand-in "
                     "torchvision.transforms (benchmarks/_torchvision_shim.py)")
    (root / "launch_example.py").write_text(
        LAUNCHER.format(threads=threads, patch_version=patch_version, shim=shim),
        encoding="utf-8")
    return notes


def _imports(module: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"],
                          capture_output=True).returncode == 0


def _needs_version_patch(example: Path) -> bool:
    import diffusers
    from packaging.version import Version
    match = re.search(r'check_min_version\(\s*"([^"]+)"', example.read_text(encoding="utf-8"))
    return bool(match) and Version(diffusers.__version__) < Version(match.group(1))


def child_env(root: Path, code: Path, threads: int) -> dict[str, str]:
    """One thread, offline, ``code`` first on the path (for our side)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
               EXAMPLE_SPEED_CODE=str(code))
    paths = [str(code)] + [p for p in [env.get("PYTHONPATH")] if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def timed_run(side: str, steps: int, args: argparse.Namespace, root: Path,
              env: dict[str, str]) -> tuple[float, float, float] | None:
    """Wall and CPU (user + system) seconds of one fresh child that trains ``side`` for
    ``steps`` steps, and its mean step from its own step timestamps (None: it failed)."""
    if side == "example":
        command = example_command(args.example, root, steps, args.resolution)
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--child", side,
                   "--root", str(root), "--steps", str(steps),
                   "--resolution", str(args.resolution), "--threads", str(args.threads)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    stamps_file = root / f"stamps-{side}-{steps}.txt"
    proc = subprocess.run(command, capture_output=True, text=True, cwd=root,
                          env=dict(env, EXAMPLE_SPEED_STAMPS=str(stamps_file),
                                   EXAMPLE_SPEED_STEPS=str(steps)))
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if proc.returncode:
        print(f"  {side} {steps} steps failed (exit {proc.returncode}):\n"
              f"{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    stamps = [float(x) for x in stamps_file.read_text().split()][:steps]  # nothing after training
    skip = min(WARMUP, len(stamps) - 2)
    inside = (stamps[-1] - stamps[skip]) / (len(stamps) - 1 - skip)
    print(f"  {side:9s} {steps:4d} steps {seconds:7.1f} s wall {cpu:7.1f} s CPU, "
          f"{inside:.4f} s/step inside ({len(stamps)} stamps)", flush=True)
    return seconds, cpu, inside


def report(best: dict[str, dict[int, float]], n: int, clock: str) -> None:
    """The table for one clock: per step from T(2N) - T(N), one-off costs, ratio to the example."""
    per_step = {side: (t[2 * n] - t[n]) / n for side, t in best.items() if len(t) == 2}
    print(f"\n{clock} time\n{'side':9s} {'T(N) s':>8s} {'T(2N) s':>8s} {'s/step':>8s} "
          f"{'steps/s':>8s} {'one-off s':>9s} {'example/side':>12s}")
    for side, t in best.items():
        if side not in per_step:
            print(f"{side:9s} (failed)")
            continue
        s = per_step[side]
        ratio = f"{per_step['example'] / s:12.2f}" if "example" in per_step else f"{'-':>12s}"
        print(f"{side:9s} {t[n]:8.1f} {t[2 * n]:8.1f} {s:8.4f} {1 / s:8.2f} "
              f"{t[n] - n * s:9.1f} {ratio}")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--example", type=Path,
                        help="diffusers' examples/dreambooth/train_dreambooth.py (see above)")
    parser.add_argument("--steps", type=int, default=100,
                        help="N: each side runs N and 2N steps (default 100)")
    parser.add_argument("--resolution", type=int, default=64, help="pixels (default 64)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="fastest of this many runs of each (default 1)")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--threads", type=int, default=1, help="threads per child (default 1)")
    parser.add_argument("--repo", type=Path, default=REPO,
                        help="checkout whose colab_dreambooth our side imports (default: this)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    # Internal: train our side in this process.
    parser.add_argument("--child", choices=SIDES[1:], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_ours(args.root, args.steps, args.resolution, cache_latents=args.child == "ours",
                 threads=args.threads)
        return 0
    if "example" in args.sides and (args.example is None or not args.example.is_file()):
        parser.error("--example PATH to train_dreambooth.py is needed for the example side")
    if args.steps < 1 or args.repeat < 1:
        parser.error("--steps and --repeat must be >= 1")

    root = Path(tempfile.mkdtemp(prefix="example-speed-"))
    try:
        for note in prepare(root, args.example if "example" in args.sides else None,
                            args.threads):
            print(f"note: {note}")
        env = child_env(root, args.repo.resolve(), args.threads)
        where = subprocess.run([sys.executable, "-c", "import colab_dreambooth as c; "
                                "print(c.__file__)"], capture_output=True, text=True,
                               env=env, cwd=root).stdout.strip()
        import diffusers
        import torch
        print(f"example_speed: N={args.steps}, {args.resolution} px, batch 1 + prior, text "
              f"encoder trained, {args.threads} thread(s), best of {args.repeat}; torch "
              f"{torch.__version__}, diffusers {diffusers.__version__}; ours from {where}")
        print(f"load average before: {_load()}")
        best = {clock: {side: {} for side in args.sides} for clock in ("wall", "CPU")}
        inside: dict[str, float] = {}
        for _ in range(args.repeat):
            for side in args.sides:
                for steps in (args.steps, 2 * args.steps):
                    times = timed_run(side, steps, args, root, env)
                    for clock, seconds in zip(("wall", "CPU"), times or ()):
                        kept = best[clock][side]
                        kept[steps] = min(seconds, kept.get(steps, seconds))
                    if times:
                        inside[side] = min(times[2], inside.get(side, times[2]))
        print(f"load average after: {_load()}")
        for clock, figures in best.items():
            report(figures, args.steps, clock)
        print(f"\nin-process mean step after {WARMUP} warm-up steps (best run)")
        for side, s in inside.items():
            ratio = inside["example"] / s if "example" in inside else float("nan")
            print(f"{side:9s} {s:8.4f} s/step {1 / s:8.2f} steps/s  example/side {ratio:.2f}")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
