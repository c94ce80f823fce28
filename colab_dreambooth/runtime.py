"""What this machine can train on: the GPU found (or the CPU) and its abilities."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceInfo:
    """The accelerator a run will use."""

    kind: str  # "cuda" or "cpu"
    name: str
    memory_gb: float = 0.0
    bf16: bool = False
    count: int = 0

    @classmethod
    def cpu(cls) -> "DeviceInfo":
        """The CPU, as a device."""
        return cls("cpu", "CPU")


def detect_device() -> DeviceInfo:
    """The first CUDA GPU with its memory and bf16 support, else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return DeviceInfo.cpu()
    props = torch.cuda.get_device_properties(0)
    return DeviceInfo("cuda", props.name, props.total_memory / 2**30,
                      bool(torch.cuda.is_bf16_supported()), torch.cuda.device_count())
