"""Peak host memory of saving and resuming a full SD 1.5 checkpoint with 32-bit AdamW.

What it measures
    The training state of full SD 1.5 fine-tuning with the text encoder (UNet 860M + CLIP 123M
    parameters in fp32, 32-bit AdamW's two moments per weight: 11.0 GiB of tensors, a 11.8 GB
    checkpoint) written by :func:`colab_dreambooth.training.checkpoints.save_checkpoint` and read
    back
    by :func:`~colab_dreambooth.training.checkpoints.load_checkpoint`, each in a fresh Python
    process.

    On a GPU that state lives in GPU memory; what matters for a free Colab (~12.7 GB of host
    RAM) is the host memory saving and resuming add. This CPU-only machine imitates that:

    * ``save``: the weights and optimizer moments are views of one file mapped with
      ``torch.from_file(shared=True)`` (page cache the kernel can write back, standing in for
      GPU memory), so the process's anonymous memory (``RssAnon``) is only what the saver
      itself allocates;
    * ``resume``: the model and optimizer live on PyTorch's ``meta`` device (a copy there
      keeps no data, as a copy to the GPU keeps none on the host), so ``RssAnon`` is what the
      loader holds on the host;
    * ``resume-format1`` (``--compare``): the loader of checkpoint format 1 (before streaming:
      ``safetensors.load_file`` of each model part and ``torch.load`` of ``optimizer.pt``);
    * ``imports``: the floor, torch + diffusers + transformers + the package imported.
    * the format-1 optimizer file (``--compare``) is written after the save is measured, each
      moment cloned into its own storage as on a real run.

    Each child samples its ``RssAnon`` every 10 ms (the peak is reported) and its ``VmHWM``
    (peak resident including mapped file pages). Weights are zeros (memory does not depend on
    the values); the 12 GB (24 GB with ``--compare``) of files go to a temporary folder
    (``--workdir``) removed at the end. Nothing is asserted.

Usage
    nice .venv/bin/python benchmarks/checkpoint_memory.py [--compare] [--workdir /big/disk]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


# ----------------------------------------------------------------------------- in the child
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """The peak ``RssAnon`` of this process, sampled on a thread every 10 ms."""

    def __init__(self) -> None:
        self.peak = _status("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _status("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status("RssAnon"))


def _config():
    from colab_dreambooth.config.settings import DreamBoothConfig

    return DreamBoothConfig(pretrained_model_name_or_path="sd15-random-weights",
                            train_text_encoder=True, use_8bit_adam=False, use_ema=False,
                            mixed_precision="fp16", max_train_steps=1000)


def _models():
    from colab_dreambooth.models.single_file.model_configs import load_model_config, meta_model

    configs = load_model_config("sd1")
    return meta_model("unet", configs["unet"]), meta_model("text_encoder",
                                                             configs["text_encoder"])


def _on_mapped_file(modules, path: Path):
    """Give every parameter (and AdamW's two moments) storage in one shared mapped file."""
    import torch

    params = [p for m in modules for p in m.parameters()]
    total = 3 * sum(p.numel() for p in params)
    storage = torch.from_file(str(path), shared=True, size=total, dtype=torch.float32)
    offset = 0

    def take(shape):
        nonlocal offset
        n = int(torch.Size(shape).numel())
        view = storage[offset:offset + n].view(shape)
        offset += n
        return view

    moments = {}
    for module in modules:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    new = torch.nn.Parameter(take(p.shape))
                    sub._parameters[name] = new
                    moments[new] = (take(p.shape), take(p.shape))
            for name, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)
    return moments


def _state(unet, text, moments=None):
    import torch

    from colab_dreambooth.training.checkpoints import TrainingState

    optimizer = torch.optim.AdamW([{"params": list(unet.parameters()), "lr": 2e-6},
                                   {"params": list(text.parameters()), "lr": 1e-6}])
    for p, (m1, m2) in (moments or {}).items():
        optimizer.state[p] = {"step": torch.tensor(400.0), "exp_avg": m1, "exp_avg_sq": m2}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return TrainingState(unet, text, optimizer, scheduler, train_text_encoder=True)


def child(case: str, workdir: Path) -> dict:
    import torch

    from colab_dreambooth.training import checkpoints  # noqa: F401  (the package's imports count)

    result = {"case": case}
    if case == "imports":
        import diffusers  # noqa: F401  (what the other cases import to build the models)
        import transformers  # noqa: F401

        result["anon_gib"] = _status("RssAnon") / GIB
        result["hwm_gib"] = _status("VmHWM") / GIB
        return result
    from colab_dreambooth.training.checkpoints import (
        Progress,
        latest_checkpoint,
        load_checkpoint,
        save_checkpoint,
    )

    config = _config()
    unet, text = _models()
    root = workdir / "checkpoints"
    if case == "save":
        state = _state(unet, text, _on_mapped_file((unet, text), workdir / "state.bin"))
        result["state_gib"] = sum(p.numel() for p in unet.parameters()) * 12 / GIB + sum(
            p.numel() for p in text.parameters()) * 12 / GIB
        before = _status("RssAnon")
        sampler = PeakSampler()
        start = time.perf_counter()
        folder = save_checkpoint(root, state, Progress(step=400, total_steps=1000), config,
                                 keep=1)
        result["seconds"] = time.perf_counter() - start
        result["checkpoint_gb"] = sum(f.stat().st_size for f in folder.iterdir()) / 1e9
        peak = sampler.stop()
        if os.environ.get("BENCH_FORMAT1"):  # the old optimizer file, for --compare: each
            # tensor cloned to its own storage (views of one would save the whole file)
            state_dict = state.optimizer.state_dict()
            torch.save({"state": {i: {k: v.clone() if v.dim() else v for k, v in s.items()}
                                  for i, s in state_dict["state"].items()},
                        "param_groups": state_dict["param_groups"]},
                       workdir / "optimizer-format1.pt")
    else:
        for module in (unet, text):  # buffers are not saved; give them CPU memory
            for sub in module.modules():
                for name, b in list(sub._buffers.items()):
                    if b is not None:
                        sub._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device="meta")
        state = _state(unet, text)
        folder = latest_checkpoint(root)
        before = _status("RssAnon")
        sampler = PeakSampler()
        start = time.perf_counter()
        if case == "resume":
            load_checkpoint(folder, state, config)
        else:  # format 1, as the package loaded it before streaming
            from safetensors.torch import load_file

            for part, module in (("unet", unet), ("text_encoder", text)):
                saved = load_file(folder / f"{part}.safetensors")
                own = module.state_dict()
                for key, value in saved.items():
                    own[key].copy_(value)
                del saved
            state.optimizer.load_state_dict(torch.load(workdir / "optimizer-format1.pt",
                                                       weights_only=True, map_location="cpu"))
        result["seconds"] = time.perf_counter() - start
        peak = sampler.stop()
    result["anon_before_gib"] = before / GIB
    result["anon_peak_gib"] = peak / GIB
    result["added_gib"] = (peak - before) / GIB
    result["hwm_gib"] = _status("VmHWM") / GIB
    return result


# ----------------------------------------------------------------------------- the parent
def run_case(case: str, workdir: Path, compare: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    if compare:
        env["BENCH_FORMAT1"] = "1"
    out = subprocess.run([sys.executable, __file__, "--child", case, "--workdir", str(workdir)],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--compare", action="store_true",
                        help="also time and measure the format-1 loader (needs ~7.5 GB more RAM)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.workdir)))
        return []

    work = Path(tempfile.mkdtemp(prefix="ckpt-memory-", dir=args.workdir))
    print(f"load average {os.getloadavg()[0]:.1f}; files in {work}")
    cases = ["imports", "save", "resume"] + (["resume-format1"] if args.compare else [])
    results = []
    try:
        for case in cases:
            results.append(run_case(case, work, args.compare))
            print(json.dumps(results[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| case | host memory (RssAnon) peak | added by save/resume | VmHWM | time |")
    print("|---|---|---|---|---|")
    for r in results:
        if r["case"] == "imports":
            print(f"| imports | {r['anon_gib']:.2f} GiB | - | {r['hwm_gib']:.2f} GiB | - |")
        else:
            print(f"| {r['case']} | {r['anon_peak_gib']:.2f} GiB | {r['added_gib']:.2f} GiB | "
                  f"{r['hwm_gib']:.2f} GiB | {r['seconds']:.0f} s |")
    return results


if __name__ == "__main__":
    main()
