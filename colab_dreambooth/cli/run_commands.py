"""The commands of a training run: ``train``, ``check-data``, ``prompts``, ``params``, ``env``
and ``demo``."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from colab_dreambooth.cli.exit_codes import EXIT_ERROR, EXIT_OK, EXIT_STOPPED, EXIT_USAGE
from colab_dreambooth.cli.options import add_config_options, config_from_args
from colab_dreambooth.config.params import (
    load_params,
    params_template,
    resolve_concepts,
    save_params,
)
from colab_dreambooth.config.settings import TINY_MODEL, TINY_MODELS, DreamBoothConfig
from colab_dreambooth.config.validation import validate
from colab_dreambooth.data.dataset import collect_training_data
from colab_dreambooth.data.images import check_folders
from colab_dreambooth.errors import ConfigError, Problem, UserError

# A problem of one image file, as collect_training_data words it; check_folders reports each
# of those already, with the file first.
_IMAGE_PROBLEM = re.compile(r"^concept \d+ (instance|class) image ")


def add_run_commands(sub) -> None:
    """Register train, check-data, prompts, params, env and demo."""

    p = sub.add_parser("train", help="train from a parameters JSON")
    p.add_argument("--resume", action="store_true", help=(
        "continue from the newest complete checkpoint (Checkpoint folder, else Checkpoint Hub "
        "repo) exactly where it stopped; starts from the beginning when there is none"))
    p.add_argument("--no-progress", action="store_true",
                   help="hide the progress bars (the log lines stay)")
    p.add_argument("--force", action="store_true", help=(
        "start even when the memory estimate says the GPU is too small or the disk plan says "
        "the checkpoints will not fit (for experts: the estimates err on the safe side)"))
    add_config_options(p)
    p.set_defaults(run=_train)

    p = sub.add_parser("check-data", help="report every problem with image folders, and with "
                       "--config everything train checks first (exit 1 on errors)")
    p.add_argument("folders", nargs="*", type=Path, help="image folders to check")
    p.add_argument("--config", type=Path, help="check every folder of this parameters JSON")
    p.add_argument("--resolution", type=int, default=None,
                   help="training resolution (default: the config's, else 512)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 on warnings too (default: only errors fail)")
    p.set_defaults(run=_check_data)

    p = sub.add_parser("prompts", help="show the prompt each training image will get")
    add_config_options(p)
    p.set_defaults(run=_prompts)

    p = sub.add_parser("params", help="write a parameters JSON with every field at its "
                       "default and one concept to fill in")
    p.add_argument("out", type=Path, help="where to write it")
    p.add_argument("--overwrite", action="store_true", help="replace the file if it exists")
    p.set_defaults(run=_params)

    p = sub.add_parser("env", help="show the runtime, GPU, packages, the GPU preset's choices "
                       "and the estimated peak GPU memory")
    p.add_argument("--config", type=Path, help="parameters JSON to estimate (default: every "
                   "field at its default)")
    p.add_argument("--presets", action="store_true", help="also print the whole preset table")
    p.add_argument("--gpu", metavar="NAME", help="plan for this GPU instead of this machine's "
                   "(e.g. \"Tesla T4\", L4, \"A100 80GB\"): its preset, the choices given "
                   "the packages installed here, the estimate and what to change")
    p.set_defaults(run=_env)

    p = sub.add_parser("demo", help="train the tiny built-in model on a synthetic subject")
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder")
    p.add_argument("--steps", type=int, default=150, help="training steps")
    p.add_argument("--save-every", type=int, default=0, metavar="K",
                   help="write a checkpoint every K steps (to try --resume)")
    p.add_argument("--resume", action="store_true",
                   help="continue the demo run in --out from its newest checkpoint")
    p.add_argument("--model", choices=TINY_MODELS, default=TINY_MODEL,
                   help="the built-in model: tiny (SD 1.x-shaped) or tiny-sdxl (SDXL-shaped)")
    p.set_defaults(run=_demo)


def _train(args: argparse.Namespace) -> int:
    from colab_dreambooth.training.train import train

    result = train(config_from_args(args), resume=args.resume, progress=not args.no_progress,
                   force=args.force)
    state = "stopped early" if result.stopped_early else "finished"
    print(f"Training {state} after {result.steps}/{result.total_steps} steps (seed {result.seed}).")
    if result.checkpoint:
        print(f"Checkpoint (continue with --resume): {result.checkpoint}")
    if result.lora_file:
        print(f"Trained LoRA (WebUI/kohya/diffusers .safetensors): {result.lora_file}")
    else:
        print(f"Trained model (diffusers folder): {result.model_dir}")
    # A half-trained model must not pass for a finished one in `train && export`.
    return EXIT_STOPPED if result.stopped_early else EXIT_OK


def _check_data(args: argparse.Namespace) -> int:
    folders = list(args.folders)
    resolution = args.resolution
    errors: list[str] = []
    warnings: list[str] = []
    if args.config:
        config = resolve_concepts(load_params(args.config))
        if resolution:
            config = config.copy(resolution=resolution)
        resolution = config.resolution
        for index, concept in enumerate(config.concepts_list):
            if concept.instance_data_dir.strip():
                folders.append(Path(concept.instance_data_dir).expanduser())
            if concept.wants_prior_preservation and config.class_dir(index).is_dir():
                folders.append(config.class_dir(index))
        more_errors, warnings = _pretraining_problems(config)
        errors += more_errors
    if not folders and not errors:
        print("error: name image folders or --config", file=sys.stderr)
        return EXIT_USAGE
    problems = check_folders(folders, resolution or 512)
    errors = [str(p) for p in problems if p.severity == "error"] + errors
    warnings = [str(p) for p in problems if p.severity != "error"] + warnings
    for message in errors:
        print(f"{'ERROR':7} {message}")
    for message in warnings:
        print(f"{'WARNING':7} {message}")
    print(f"{len(folders)} folder(s) checked: {len(errors)} error(s), "
          f"{len(warnings)} warning(s).")
    if errors or (warnings and args.strict):
        return EXIT_ERROR
    return EXIT_OK


def _pretraining_problems(config: DreamBoothConfig) -> tuple[list[str], list[str]]:
    """(errors, warnings) that ``train`` would find before loading a model, other than the
    per-file image problems: settings (validation, LoRA), prompts, captions and tokens, class
    image counts. Class images still to generate are a warning here, as ``train`` makes them."""
    from colab_dreambooth.data.dataset import DataError

    errors = [str(p) for p in validate(config)
              if not p.where.endswith(("instance_data_dir", "class_data_dir"))]
    try:
        warnings = collect_training_data(config, require_class_images=False).warnings
    except DataError as exc:
        errors += exc.problems
        warnings = exc.warnings
    keep = [m for m in errors if not _IMAGE_PROBLEM.match(m)]
    return keep, [m for m in warnings if not _IMAGE_PROBLEM.match(m)]


def _prompts(args: argparse.Namespace) -> int:
    config = resolve_concepts(config_from_args(args))
    if not config.concepts_list:
        raise ConfigError([Problem("concepts_list", "no concept: add one to concepts_list (or "
                                   "name a concepts_path file) with its instance folder and "
                                   "prompts; the README shows an example")])
    data = collect_training_data(config, require_class_images=False)
    for index, concept in enumerate(config.concepts_list):
        print(f"Concept {index + 1} ({concept.instance_data_dir})")
        for example in (e for e in data.instance if e.concept == index):
            print(f"  instance  {example.image.name:32} {example.prompt}")
        for example in data.classes.get(index, []):
            print(f"  class     {example.image.name:32} {example.prompt}")
    for warning in data.warnings:
        print(f"WARNING {warning}")
    return EXIT_OK


def _params(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.overwrite:
        raise UserError(f"{args.out} already exists: choose another name, or pass --overwrite "
                        "to replace it with the defaults")
    save_params(params_template(), args.out)
    print(f"Wrote the default parameters, with one concept to fill in, to {args.out}")
    return EXIT_OK


def _env(args: argparse.Namespace) -> int:
    from colab_dreambooth.config.presets import describe_presets
    from colab_dreambooth.runtime.device import gpu_by_name
    from colab_dreambooth.training.fit import describe_sdxl_presets, environment_report

    config = resolve_concepts(load_params(args.config)) if args.config else DreamBoothConfig()
    device = gpu_by_name(args.gpu) if args.gpu else None
    print(environment_report(config, device, planned=device is not None))
    if args.presets:
        print("\nAll presets (blank fields take the values of the GPU's row):")
        print(describe_presets())
        print("\nSDXL models (the family is read from the base model) replace some of them; "
              "the estimated peak at 1024 px with prior preservation, LoRA rank 32:")
        print(describe_sdxl_presets())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from colab_dreambooth.demo import run_demo

    result = run_demo(args.out, steps=args.steps, save_every=args.save_every,
                      resume=args.resume, model=args.model)
    return EXIT_STOPPED if result.stopped_early else EXIT_OK
