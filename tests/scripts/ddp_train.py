"""Run by tests/test_multiprocess.py under ``accelerate launch``: train a parameters JSON, and
have every process write a digest of its UNet and text-encoder weights just before the model is saved (so the
test can check the processes stayed in sync)."""

from __future__ import annotations

import argparse
import hashlib
import threading
from pathlib import Path

import torch

from colab_dreambooth.config.params import load_params
from colab_dreambooth.training import train as train_module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("params", type=Path)
    parser.add_argument("--digests", type=Path, required=True)
    parser.add_argument("--stop-at", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    save = train_module.save_model

    def save_with_digest(accelerator, config, parts, unet, *rest):
        digest = hashlib.sha256()
        text_encoder = rest[0]  # SDXL: both encoders
        for model in (unet, text_encoder):
            for tensor in accelerator.unwrap_model(model).state_dict().values():
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
        args.digests.mkdir(parents=True, exist_ok=True)
        (args.digests / f"rank{accelerator.process_index}.txt").write_text(digest.hexdigest())
        return save(accelerator, config, parts, unet, *rest)

    train_module.save_model = save_with_digest
    stop = threading.Event()

    def on_step(step: int, loss: float, lr: float) -> None:
        import os

        # Only the main process asks: the loop must carry the request to the others.
        if args.stop_at and step == args.stop_at and os.environ.get("RANK", "0") == "0":
            stop.set()

    result = train_module.train(load_params(args.params), stop=stop, on_step=on_step,
                                resume=args.resume, progress=False)
    print(f"steps={result.steps} stopped={result.stopped_early}", flush=True)


if __name__ == "__main__":
    main()
