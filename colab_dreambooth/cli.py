"""``colab-dreambooth`` (also ``python -m colab_dreambooth``): train, check data, show prompts, demo,
show the runtime (``env``).

Every configuration field is also a ``train``/``prompts`` option (``--learning-rate 1e-6``),
generated from the configuration model, so the CLI never lags behind the fields.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import re
import sys
from pathlib import Path
from typing import Sequence

from .config import DreamBoothConfig
from .console import configure_logging, hide_library_progress
from .data import collect_training_data
from .errors import UserError
from .fields import FieldSpec, field_specs
from .images import check_folders
from .params import load_params, params_template, resolve_concepts, save_params
from .validation import ConfigError, Problem, validate

# Stages whose commands live beside the code they run: each has add_subcommand(subparsers).
SUBCOMMAND_MODULES = ("class_images", "sample", "model_card", "convert", "export",
                      "dehydrate")

OVERRIDABLE = {name: spec for name, spec in field_specs(DreamBoothConfig).items()
               if spec.type in (str, int, float, bool)}
# What an option of a field that may be blank takes to blank it (``--max-train-steps none``).
BLANK_WORDS = ("none", "blank", "auto")


class _Blank:
    """Parsed value of ``none`` for a field that may be blank (None means "not given")."""

    def __repr__(self) -> str:
        return "BLANK"


BLANK = _Blank()


# Exit codes (the README lists them): scripts can chain ``train && export`` safely.
EXIT_OK = 0
EXIT_ERROR = 1  # a problem with the input or the situation; one "error: ..." line says what
EXIT_USAGE = 2  # unknown option or bad value (argparse)
EXIT_STOPPED = 130  # stopped before the last step (Ctrl-C, Stop): checkpoint and model written


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (``EXIT_*``)."""
    parser = _parser()
    args = parser.parse_args(argv)
    configure_logging()
    if getattr(args, "no_progress", False):
        hide_library_progress()
    try:
        return args.run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # a file missing or unreadable, a full disk: the user's situation
        print(f"error: {_describe_os_error(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_STOPPED
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch's, on CUDA (no import here)
            print(f"error: out of GPU memory ({str(exc).splitlines()[0]}). Lower the batch "
                  "size or resolution, or turn on gradient checkpointing, 8-bit Adam or LoRA; "
                  "`colab-dreambooth env --config PARAMS` shows the estimate", file=sys.stderr)
            return EXIT_ERROR
        raise  # anything else is a bug: keep its traceback for the report


def _describe_os_error(exc: OSError) -> str:
    what = {errno.ENOENT: "not found", errno.EACCES: "permission denied",
            errno.ENOSPC: "no space left on the disk", errno.EISDIR: "is a folder, not a file",
            errno.ENOTDIR: "is not a folder"}.get(exc.errno or 0)
    if what and exc.filename:
        return f"{exc.filename}: {what}"
    return str(exc)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colab-dreambooth", description=(
        "DreamBooth fine-tuning of Stable Diffusion with the AUTOMATIC1111 extension's fields."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train from a parameters JSON")
    p.add_argument("--resume", action="store_true", help=(
        "continue from the newest complete checkpoint (Checkpoint folder, else Checkpoint Hub "
        "repo) exactly where it stopped; starts from the beginning when there is none"))
    p.add_argument("--no-progress", action="store_true",
                   help="hide the progress bars (the log lines stay)")
    p.add_argument("--force", action="store_true", help=(
        "start even when the memory estimate says the GPU is too small or the disk plan says "
        "the checkpoints will not fit (for experts: the estimates err on the safe side)"))
    _add_config_options(p)
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
    _add_config_options(p)
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
    p.set_defaults(run=_demo)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").add_subcommand(sub)
    return parser


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="parameters JSON")
    group = p.add_argument_group("overrides (any field of the parameters JSON)")
    for name, spec in OVERRIDABLE.items():
        group.add_argument("--" + name.replace("_", "-"), dest=f"set_{name}",
                           type=_parser_type(spec), default=None, metavar=_metavar(spec),
                           help=f"{spec.setting.label}: {spec.setting.help}".replace("%", "%%"))


def _parser_type(spec: FieldSpec):
    convert = _boolean if spec.type is bool else spec.type
    if not spec.optional:
        return convert

    def optional(text: str):
        if text.strip().lower() in BLANK_WORDS + ("",):
            return BLANK
        return convert(text)

    optional.__name__ = convert.__name__  # argparse names the type in its error messages
    return optional


def _metavar(spec: FieldSpec) -> str:
    if spec.setting.choices:
        blank = ("auto",) if spec.optional else ()
        return "{" + ",".join(map(str, spec.setting.choices + blank)) + "}"
    metavar = {bool: "true|false", int: "N", float: "X", str: "TEXT"}[spec.type]
    return metavar + "|none" if spec.optional else metavar


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def config_from_args(args: argparse.Namespace) -> DreamBoothConfig:
    """The parameters JSON of ``--config`` with the command-line overrides applied."""
    config = load_params(args.config)
    changes = {name: getattr(args, f"set_{name}") for name in OVERRIDABLE
               if getattr(args, f"set_{name}") is not None}
    changes = {name: None if value is BLANK else value for name, value in changes.items()}
    return config.copy(**changes) if changes else config


def _train(args: argparse.Namespace) -> int:
    from .train import train

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


# A problem of one image file, as collect_training_data words it; check_folders reports each
# of those already, with the file first.
_IMAGE_PROBLEM = re.compile(r"^concept \d+ (instance|class) image ")


def _pretraining_problems(config: DreamBoothConfig) -> tuple[list[str], list[str]]:
    """(errors, warnings) that ``train`` would find before loading a model, other than the
    per-file image problems: settings (validation, LoRA), prompts, captions and tokens, class
    image counts. Class images still to generate are a warning here, as ``train`` makes them."""
    from .data import DataError

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
    from .presets import describe_presets
    from .runtime import environment_report

    from .gpus import gpu_by_name

    config = resolve_concepts(load_params(args.config)) if args.config else DreamBoothConfig()
    device = gpu_by_name(args.gpu) if args.gpu else None
    print(environment_report(config, device, planned=device is not None))
    if args.presets:
        print("\nAll presets (blank fields take the values of the GPU's row):")
        print(describe_presets())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.out, steps=args.steps, save_every=args.save_every,
                      resume=args.resume)
    return EXIT_STOPPED if result.stopped_early else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
