"""GPUs a user may rent, by name, to plan a run for one that is not here
(``colab-dreambooth env --gpu "Tesla T4"``): memory as PyTorch reports it, compute capability.
"""

from __future__ import annotations

import re

from colab_dreambooth.errors import ConfigError, Problem
from colab_dreambooth.runtime.environment import DeviceInfo

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


__all__ = ["KNOWN_GPUS", "gpu_by_name"]
