"""Time, peak host memory and reconstruction error of extract-lora on full-size SD 1.5 shapes.

What it measures
    The base is a Stable Diffusion 1.5-shaped diffusers folder with random seeded fp32 weights
    (UNet 860M, text encoder 123M, VAE 84M parameters; time and memory do not depend on the
    values); the "fine-tuned" copy changes every UNet and text-encoder tensor by a
    decaying-spectrum low-rank part plus i.i.d. noise (``--noise-share`` of its energy), both
    built by ``benchmarks/dehydrate_size.py``. Each ``--ranks`` R is then extracted by
    :func:`colab_dreambooth.models.lora_extract.extract_lora` in a fresh process, which reports

    * wall time of the call, and the process's peak RSS (``VmHWM``, imports included; "over
      imports" subtracts the peak before the call);
    * the file size and layer counts, and the mean/max relative error
      ``||change - up @ down|| / ||change||`` per layer (of this synthetic change only: a real
      fine-tune's spectrum decides its own).

    Free Colab has 12.7 GB of host RAM; two SD 1.5 models loaded whole would take ~8.6 GB in
    fp32. Nothing is asserted; timings are wall-clock on a machine that may be shared (the load
    average is printed).

Usage
    .venv/bin/python benchmarks/extract_lora.py                       # rank 32, min_diff 0
    .venv/bin/python benchmarks/extract_lora.py --ranks 8 32 128 --conv-rank 16 --threads 1
    Needs ~9 GB of free disk in --work (default: a temporary folder, removed afterwards).
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for folder in (REPO, HERE):  # the package from a checkout, and dehydrate_size's model builders
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from dehydrate_size import build_base, make_trained, peak_rss_kib  # noqa: E402


def run_one(args: argparse.Namespace) -> dict:
    """One extraction in this process; its figures."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch

    from colab_dreambooth.models.lora_extract import extract_lora

    if args.threads:
        torch.set_num_threads(args.threads)
    before = peak_rss_kib()
    start = time.perf_counter()
    report = extract_lora(args.base, args.tuned, args.out, rank=args.rank,
                          conv_rank=args.conv_rank, min_diff=args.min_diff,
                          device=args.device, progress=False)
    seconds = time.perf_counter() - start
    peak = peak_rss_kib()
    unet, te = report.error_summary("unet"), report.error_summary("text_encoder")
    return {"rank": args.rank, "conv_rank": args.conv_rank, "seconds": seconds,
            "peak_rss_mib": peak / 1024, "over_imports_mib": (peak - before) / 1024,
            "file_bytes": report.file_bytes, "layers": report.layers,
            "text_encoder": report.text_encoder, "unet_error": unet[:2], "te_error": te[:2],
            "threads": torch.get_num_threads(), "device": args.device or "default"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="*", default=[32])
    parser.add_argument("--conv-rank", type=int, default=0)
    parser.add_argument("--min-diff", type=float, default=0.0,
                        help="default 0: the synthetic text-encoder change is small, keep it")
    parser.add_argument("--noise-share", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if any)")
    parser.add_argument("--work", type=Path, default=None,
                        help="working folder (default: temp); models in it are reused")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    # Internal: one extraction in this process, printed as a RESULT line.
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tuned", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=32, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return 0

    work = args.work or Path(tempfile.mkdtemp(prefix="extract-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"Working in {work}; load average {os.getloadavg()}", flush=True)
    base, tuned = work / "base", work / f"tuned-{args.noise_share:g}"
    try:
        if not (base / "model_index.json").is_file():
            start = time.perf_counter()
            build_base(base)
            print(f"built the base in {time.perf_counter() - start:.0f} s", flush=True)
        if not (tuned / "model_index.json").is_file():
            start = time.perf_counter()
            make_trained(base, tuned, ema=False, noise_share=args.noise_share)
            print(f"built the tuned copy in {time.perf_counter() - start:.0f} s", flush=True)
        print(f"{'rank':>4} {'conv':>4} {'time':>8} {'peak RSS':>9} {'over imp.':>9} "
              f"{'file':>9} {'layers u/te':>11} {'UNet err mean/max':>18} {'TE err mean/max':>16}")
        for rank in args.ranks:
            out = work / f"r{rank}.safetensors"
            out.unlink(missing_ok=True)
            cmd = [sys.executable, __file__, "--one", "--base", str(base), "--tuned", str(tuned),
                   "--out", str(out), "--rank", str(rank), "--conv-rank", str(args.conv_rank),
                   "--min-diff", str(args.min_diff)]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            cmd += ["--device", args.device] if args.device else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"rank {rank} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
                return 1
            r = json.loads(line[7:])
            print(f"{rank:>4} {args.conv_rank:>4} {r['seconds']:>7.1f}s "
                  f"{r['peak_rss_mib'] / 1024:>7.2f}GB {r['over_imports_mib'] / 1024:>7.2f}GB "
                  f"{r['file_bytes'] / 1e6:>7.1f}MB "
                  f"{r['layers'].get('unet', 0):>5}/{r['layers'].get('text_encoder', 0):<5} "
                  f"{r['unet_error'][0]:>8.1%}/{r['unet_error'][1]:<8.1%} "
                  f"{r['te_error'][0]:>7.1%}/{r['te_error'][1]:<7.1%}", flush=True)
        print(f"threads {r['threads']}, device {r['device']}, load average {os.getloadavg()}")
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
