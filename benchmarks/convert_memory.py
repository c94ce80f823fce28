"""Peak memory and time of Create Model (single-file import) on a full-size SD 1.5 (or, with
``--model sdxl``, SDXL base 1.0) checkpoint.

What it measures
    A full-size Stable Diffusion 1.5 checkpoint with random weights (UNet 860M, text encoder
    123M, VAE 84M parameters: 4.27 GB in fp32) or SDXL base 1.0 (UNet 2.57B, text encoders 123M
    and 695M, VAE 84M: 6.94 GB in fp16, as SDXL ships), in the original single-file layout,
    converted into a diffusers folder by

    * ``ours``: :func:`colab_dreambooth.models.single_file.convert.convert_single_file` (from
    ``.safetensors`` and
      from ``.ckpt``, fp32 and ``--fp16``), and
    * ``diffusers``: ``StableDiffusionPipeline.from_single_file(path, config=<our SD 1.5 config
      folder>, local_files_only=True)`` (``StableDiffusionXLPipeline`` for SDXL),
      followed by reading every weight once ("load+read") or by ``save_pretrained``
      ("load+save", the same job as ours);

    plus our exporter (diffusers folder -> one ``.safetensors``) for reference. Each runs in a
    fresh Python process; the parent reads its peak resident memory from ``wait4``'s
    ``ru_maxrss`` (the process's VmHWM: everything resident, including pages of memory-mapped
    files it read), samples ``RssAnon`` (memory the process itself allocated, without file pages,
    which the kernel can drop under pressure) from ``/proc/<pid>/status`` every 20 ms, and times
    the work itself ("work") and the whole process with its imports ("process"). "imports" only
    imports torch, diffusers and transformers: the memory floor under every row.

How
    The checkpoint is made without building the models: the diffusers folder's weights are
    written tensor by tensor (``torch.randn`` of each shape from the shipped SD 1.5 or SDXL
    configs), then exported with our exporter to ``.safetensors`` and ``.ckpt`` (SDXL: fp16;
    ``--skip-ckpt`` leaves the ``.ckpt``, whose writing holds the whole model in memory, out).
    Everything lives in a temporary folder (``--workdir`` to choose where; ~14 GB at most for
    SD 1.5, ~35 GB for SDXL) that is removed at the end.
    Times are wall-clock on a machine that may be shared (the load average is printed). Nothing
    is asserted; target: ours under 4.6 GB, aiming for 2 GB.

Usage
    .venv/bin/python benchmarks/convert_memory.py
    .venv/bin/python benchmarks/convert_memory.py --skip-diffusers --workdir /big/disk
    .venv/bin/python benchmarks/convert_memory.py --model sdxl --skip-diffusers --skip-ckpt
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

BUILD = r"""
import math, sys, torch
from pathlib import Path
from colab_dreambooth.models.single_file.model_configs import (load_model_config, meta_model,
                                                              write_config_folder)
from colab_dreambooth.safetensors_stream import TensorSpec, write_sharded
folder, variant = Path(sys.argv[1]), sys.argv[2]
dtype = torch.float16 if variant == "sdxl" else torch.float32
configs = load_model_config(variant)
write_config_folder(configs, folder, dtype)
gen = torch.Generator().manual_seed(0)
for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
    if part not in configs:
        continue
    state = meta_model(part, configs[part]).state_dict()
    specs = [TensorSpec(k, tuple(v.shape), dtype) for k, v in state.items()]
    print(part, sum(math.prod(s.shape) for s in specs) / 1e6, "M parameters", flush=True)
    stem = "model" if part.startswith("text_encoder") else "diffusion_pytorch_model"
    write_sharded(folder / part, stem, specs,
                  lambda s: (torch.randn(s.shape, generator=gen) * 0.02).to(dtype), 10 << 30)
"""

# (imports, the work that is timed); argv: 1 = source file, 2 = output, 3 = diffusers folder.
# The diffusers rows name StableDiffusionPipeline; --model sdxl runs them with the XL pipeline.
CASES = {
    "imports": ("import torch, diffusers, transformers; from diffusers import StableDiffusionPipeline",
                "pass"),
    "ours": ("from colab_dreambooth.models.single_file.convert import convert_single_file as c",
             "c(sys.argv[1], sys.argv[2], progress=False)"),
    "ours-fp16": ("from colab_dreambooth.models.single_file.convert import convert_single_file as c",
                  "c(sys.argv[1], sys.argv[2], fp16=True, progress=False)"),
    # Loading maps the file without reading it; reading every weight once (as moving the
    # model to the GPU does) is what makes it resident.
    "diffusers-load": ("from diffusers import StableDiffusionPipeline as P",
                       "p = P.from_single_file(sys.argv[1], config=sys.argv[3], "
                       "local_files_only=True, safety_checker=None); "
                       "[w.sum() for m in (p.unet, p.vae, p.text_encoder) for w in m.parameters()]"),
    "diffusers-load+save": ("from diffusers import StableDiffusionPipeline as P",
                            "p = P.from_single_file(sys.argv[1], config=sys.argv[3], "
                            "local_files_only=True, safety_checker=None); "
                            "p.save_pretrained(sys.argv[2])"),
    "export": ("from colab_dreambooth.models.single_file.export import export_single_file as e",
               "e(sys.argv[3], sys.argv[2], progress=False)"),
}


def measure(case: str, *args: str, sdxl: bool = False) -> dict:
    """Run a case in a fresh interpreter: its peak RSS (wait4), sampled peak RssAnon, the time
    of its work alone and of the whole process (imports included)."""
    setup, work = CASES[case]
    if sdxl:
        setup = setup.replace("StableDiffusionPipeline", "StableDiffusionXLPipeline")
        work = (work.replace(", safety_checker=None", "")
                .replace("p.text_encoder)", "p.text_encoder, p.text_encoder_2)")
                .replace("e(sys.argv[3], sys.argv[2], ", "e(sys.argv[3], sys.argv[2], fp16=True, "))
    code = (f"import sys, time\n{setup}\nstart = time.perf_counter()\n{work}\n"
            "print('WORK_SECONDS', time.perf_counter() - start)")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    anon = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        anon = max(anon, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    output = proc.stdout.read()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{case} failed:\n{output[-3000:]}")
    work_seconds = float(output.rsplit("WORK_SECONDS", 1)[1].split()[0])
    return {"peak_rss": usage.ru_maxrss * 1024, "peak_anon": anon, "work_seconds": work_seconds,
            "process_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where the temp folder goes")
    parser.add_argument("--model", choices=("sd1", "sdxl"), default="sd1",
                        help="SD 1.5 (default) or SDXL base 1.0 shapes")
    parser.add_argument("--skip-diffusers", action="store_true", help="only our converter")
    parser.add_argument("--skip-ckpt", action="store_true", help="no .ckpt (its export holds "
                        "the whole model in memory)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    print(f"load average before: {os.getloadavg()}")
    work = Path(tempfile.mkdtemp(prefix="convert-memory-", dir=args.workdir))
    results: dict[str, dict] = {}
    try:
        sdxl = args.model == "sdxl"
        name = "sdxl" if sdxl else "sd15"
        folder, sft, ckpt = (work / f"{name}-diffusers", work / f"{name}.safetensors",
                             work / f"{name}.ckpt")
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", BUILD, str(folder), args.model], cwd=REPO,
                       check=True)
        print(f"built the random {name} diffusers folder in {time.perf_counter() - t:.0f} s")
        results["export"] = measure("export", "", str(sft), str(folder), sdxl=sdxl)
        if not args.skip_ckpt:
            subprocess.run([sys.executable, "-c", "import sys\nfrom colab_dreambooth.models.single_file.export import "
                            "export_single_file as e; e(sys.argv[1], sys.argv[2], "
                            f"fp16={sdxl}, progress=False)",
                            str(folder), str(ckpt)], cwd=REPO, check=True)
        print(f"checkpoint: {sft.stat().st_size / 1e9:.2f} GB .safetensors"
              + ("" if args.skip_ckpt else f", {ckpt.stat().st_size / 1e9:.2f} GB .ckpt")
              + (" (fp16)" if sdxl else " (fp32)"))
        results["imports"] = measure("imports", sdxl=sdxl)
        runs = [("ours (.safetensors)", "ours", sft), ("ours (.ckpt)", "ours", ckpt),
                ("ours --fp16 (.safetensors)", "ours-fp16", sft)]
        if not args.skip_diffusers:
            runs += [("diffusers (.safetensors): load+read", "diffusers-load", sft),
                     ("diffusers (.safetensors): load+save", "diffusers-load+save", sft),
                     ("diffusers (.ckpt): load+save", "diffusers-load+save", ckpt)]
        if args.skip_ckpt:
            runs = [run for run in runs if run[2] != ckpt]
        for label, case, source in runs:
            out = work / "out"
            results[label] = measure(case, str(source), str(out), str(folder), sdxl=sdxl)
            shutil.rmtree(out, ignore_errors=True)
            print(f"{label:40} done", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average after: {os.getloadavg()}")
    print()
    print(f"{'run':40} {'peak RSS':>10} {'peak anon':>10} {'work':>8} {'process':>8}")
    for label, r in results.items():
        print(f"{label:40} {r['peak_rss'] / 2**30:6.2f} GiB {r['peak_anon'] / 2**30:6.2f} GiB "
              f"{r['work_seconds']:6.1f} s {r['process_seconds']:6.1f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
