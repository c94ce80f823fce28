"""Memory Attention: xformers where it really runs, otherwise PyTorch's scaled-dot-product
attention (its flash or memory-efficient kernel where the GPU and dtype allow)."""

from __future__ import annotations

import importlib.util
import logging

log = logging.getLogger(__name__)


def set_memory_attention(unet, choice: str, on_cuda: bool) -> str:
    """Apply the Memory Attention choice to ``unet``; return what is actually used."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if choice == "xformers":
        if not on_cuda:
            log.warning("xformers needs a CUDA GPU: using PyTorch scaled-dot-product attention")
        elif importlib.util.find_spec("xformers") is None:
            log.warning("xformers is not installed (pip install 'colab-dreambooth[cuda]'): "
                        "using PyTorch scaled-dot-product attention, which needs about as "
                        "little memory")
        else:
            try:
                unet.enable_xformers_memory_efficient_attention()
                return "xformers"
            except Exception as exc:  # a wheel built for another torch fails only here
                log.warning("xformers could not be used (%s): using PyTorch scaled-dot-product "
                            "attention", exc)
    # PyTorch SDPA picks its flash or memory-efficient kernel where the GPU and dtype allow,
    # which is what "flash_attention" asks for.
    unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"
