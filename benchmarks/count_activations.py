"""What SD 1.5's and SDXL's UNets keep for the backward pass, counted on the meta device.

The memory estimate's SDXL activations (colab_dreambooth/training/memory.py) are SD 1.5's
measured figures times the ratio of these counts: no GPU, no weights, a few seconds.

How it counts (one row, fp16 weights, frozen, the input latents requiring gradients as
LoRA's backward does):

* without checkpointing: every tensor autograd saves (``saved_tensors_hooks``), each storage
  once, the weights left out; attention as the memory-efficient kernel saves it (q, k, v,
  the output and the fp32 log-sum-exp; never the score matrix);
* with diffusers' gradient checkpointing: what is saved outside the checkpointed blocks,
  their inputs, and the largest block's saves (recomputed during the backward pass).

Usage
    python benchmarks/count_activations.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

GIB = 2**30


def _efficient_attention():
    """F.scaled_dot_product_attention as the memory-efficient kernel saves it."""
    import torch

    class Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = torch.empty_like(q)
            lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v, _, _ = ctx.saved_tensors
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        return Attention.apply(q, k, v)

    return attention


def saved_gib(unet_config: dict, resolution: int, context: int, *,
              checkpointing: bool) -> float:
    """GiB the UNet of ``unet_config`` keeps for the backward pass of one row."""
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    def key(t):
        return t.untyped_storage()._cdata

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config).to(torch.float16)
    unet.requires_grad_(False)
    weights = {key(p) for p in unet.parameters()}

    def counter(into: dict):
        def pack(t):
            if key(t) not in weights:
                into[key(t)] = t.untyped_storage().nbytes()
            return t
        return pack

    outside, inputs, blocks = {}, {}, []

    def checkpointed(fn, *args, **kwargs):  # diffusers' _gradient_checkpointing_func
        for a in args:
            if torch.is_tensor(a):
                inputs[key(a)] = a.untyped_storage().nbytes()
        inner = {}
        with torch.autograd.graph.saved_tensors_hooks(counter(inner), lambda t: t):
            out = fn(*args, **kwargs)
        blocks.append(sum(inner.values()))

        def detach(o):
            return o.detach().requires_grad_(True) if torch.is_tensor(o) and \
                o.is_floating_point() else o
        return tuple(detach(o) for o in out) if isinstance(out, tuple) else detach(out)

    if checkpointing:
        unet.enable_gradient_checkpointing()
        for module in unet.modules():
            if hasattr(module, "_gradient_checkpointing_func"):
                module._gradient_checkpointing_func = checkpointed
    unet.train()
    side = resolution // 8
    sample = torch.randn(1, 4, side, side, device="meta", dtype=torch.float16,
                         requires_grad=True)
    states = torch.randn(1, 77, context, device="meta", dtype=torch.float16)
    extra = {}
    if unet_config.get("addition_embed_type") == "text_time":
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, 1280, device="meta", dtype=torch.float16),
            "time_ids": torch.randn(1, 6, device="meta", dtype=torch.float16)}
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _efficient_attention()
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter(outside), lambda t: t):
            unet(sample, torch.tensor([500], device="meta"), states, **extra)
    finally:
        F.scaled_dot_product_attention = original
    total = sum(outside.values()) + sum(inputs.values()) + (max(blocks) if blocks else 0)
    return total / GIB


def counts() -> dict[str, float]:
    """The four counts (GiB): SD 1.5 at 512 px and SDXL at 1024 px, with and without
    checkpointing."""
    from gpu_train import SDXL_CONFIGS

    sd1 = json.loads((REPO / "colab_dreambooth" / "models" / "single_file" / "configs"
                      / "sd1.json").read_text())["unet"]
    return {f"{name}{' checkpointed' if ckpt else ''}": saved_gib(config, px, context,
                                                                  checkpointing=ckpt)
            for ckpt in (False, True)
            for name, config, px, context in (("SD 1.5", sd1, 512, 768),
                                              ("SDXL", SDXL_CONFIGS["unet"], 1024, 2048))}


def main() -> dict[str, float]:
    found = counts()
    for name, gib in found.items():
        print(f"{name:22} {gib:.3f} GiB")
    for suffix in ("", " checkpointed"):
        print(f"SDXL / SD 1.5{suffix}: x{found['SDXL' + suffix] / found['SD 1.5' + suffix]:.2f}")
    return found


if __name__ == "__main__":
    main()
