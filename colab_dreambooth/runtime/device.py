"""The accelerator a run uses: the GPU found (or the CPU) with its memory and abilities, and the
GPUs a user may rent, by name, to plan a run for one that is not here
(``colab-dreambooth env --gpu "Tesla T4"``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from colab_dreambooth.errors import ConfigError, Problem


@dataclass(frozen=True)
class DeviceInfo:
    """The accelerator a run will use.

    ``memory_gb`` is the first GPU's memory in GiB as PyTorch reports it (a "16 GB" T4 shows
    about 15); ``capability`` is its CUDA compute capability, (0, 0) on the CPU;
    ``free_memory_gb`` is what was free when detected (None: not measured, e.g. a GPU planned
    for with ``env --gpu``).
    """

    kind: str  # "cuda" or "cpu"
    name: str
    memory_gb: float = 0.0
    bf16: bool = False
    count: int = 0
    capability: tuple[int, int] = (0, 0)
    free_memory_gb: float | None = None

    @property
    def usable_memory_gb(self) -> float:
        """The memory a run can have: the free memory when measured, else all of it."""
        if self.free_memory_gb is None:
            return self.memory_gb
        return min(self.memory_gb, self.free_memory_gb)

    @classmethod
    def cpu(cls) -> "DeviceInfo":
        """The CPU, as a device."""
        return cls("cpu", "CPU")

    @property
    def tf32(self) -> bool:
        """TensorFloat-32 matmuls (Ampere, compute capability 8.0, and newer)."""
        return self.kind == "cuda" and self.capability >= (8, 0)

    @property
    def flash_attention(self) -> bool:
        """PyTorch's flash-attention kernel runs here (Ampere and newer); older GPUs get its
        memory-efficient kernel, which saves as much memory but is slower."""
        return self.kind == "cuda" and self.capability >= (8, 0)


def detect_device() -> DeviceInfo:
    """The first CUDA GPU with its memory, compute capability and bf16 support, else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return DeviceInfo.cpu()
    props = torch.cuda.get_device_properties(0)
    capability = (props.major, props.minor)
    # Not torch.cuda.is_bf16_supported(): recent versions answer True on a T4 or V100,
    # where bf16 is only emulated and far slower than fp16.
    try:  # another notebook or an earlier run in this kernel may hold some of it
        # What PyTorch's cache holds unused is free for this process's run too.
        unused = torch.cuda.memory_reserved(0) - torch.cuda.memory_allocated(0)
        free = (torch.cuda.mem_get_info(0)[0] + unused) / 2**30
    except Exception:  # a driver without the query
        free = None
    return DeviceInfo("cuda", props.name, props.total_memory / 2**30, capability >= (8, 0),
                      torch.cuda.device_count(), capability, free)


# (pattern, CUDA's name, GiB as torch reports it, compute capability); the first match wins,
# so an 80 GB pattern comes before its 40 GB sibling.
KNOWN_GPUS: tuple[tuple[str, str, float, tuple[int, int]], ...] = (
    (r"\bT4\b", "Tesla T4", 14.7, (7, 5)),
    (r"\bP100\b", "Tesla P100-PCIE-16GB", 15.9, (6, 0)),
    (r"\bV100\b.*32", "Tesla V100-SXM2-32GB", 31.7, (7, 0)),
    (r"\bV100\b", "Tesla V100-SXM2-16GB", 15.8, (7, 0)),
    (r"\bL4\b", "NVIDIA L4", 22.0, (8, 9)),
    (r"\bA10G?\b", "NVIDIA A10G", 22.0, (8, 6)),
    (r"\bA100\b.*80", "NVIDIA A100-SXM4-80GB", 79.1, (8, 0)),
    (r"\bA100\b", "NVIDIA A100-SXM4-40GB", 39.4, (8, 0)),
    (r"\bH100\b", "NVIDIA H100 80GB HBM3", 79.1, (9, 0)),
    (r"\bH200\b", "NVIDIA H200", 139.8, (9, 0)),
    (r"\bRTX\s*4090\b", "NVIDIA GeForce RTX 4090", 23.6, (8, 9)),
    (r"\bRTX\s*3090\b", "NVIDIA GeForce RTX 3090", 23.7, (8, 6)),
    (r"\bRTX\s*3060\b", "NVIDIA GeForce RTX 3060", 11.8, (8, 6)),
)


def gpu_by_name(name: str) -> DeviceInfo:
    """The GPU called ``name`` ("Tesla T4", "A100 80GB", "L4", ...), as if detected; its free
    memory is unknown, so all of it counts. Raises :class:`ConfigError` naming the GPUs known."""
    for pattern, full_name, memory, capability in KNOWN_GPUS:
        if re.search(pattern, name, re.IGNORECASE):
            return DeviceInfo("cuda", full_name, memory, capability >= (8, 0), 1, capability)
    known = ", ".join(dict.fromkeys(g[1] for g in KNOWN_GPUS))
    raise ConfigError([Problem("--gpu", f"unknown GPU {name!r}: name one of {known}")])


__all__ = ["DeviceInfo", "KNOWN_GPUS", "detect_device", "gpu_by_name"]
