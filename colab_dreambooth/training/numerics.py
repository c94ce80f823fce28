"""Process-wide numeric settings of a run: TF32 matmuls, deterministic algorithms, and the
full-fp16 ("half model") weights for the smallest GPUs.

:func:`apply_numerics` sets torch's global flags for a run and returns a :class:`Numerics`
whose :meth:`~Numerics.restore` puts the previous values back, so a notebook that runs a
second training with the options off really has them off.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

# cuBLAS reproducibility: a fixed workspace per stream (NVIDIA's documented setting).
CUBLAS_WORKSPACE = ":4096:8"


@dataclass
class Numerics:
    """The flags a run changed, and their values before it."""

    saved: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str | None] = field(default_factory=dict)

    def restore(self) -> None:
        """Put back every flag and environment variable changed by :func:`apply_numerics`."""
        for name, value in self.saved.items():
            _set_flag(name, value)
        for key, value in self.env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.saved.clear()
        self.env.clear()


_FLAGS = {
    "matmul.allow_tf32": (lambda: torch.backends.cuda.matmul.allow_tf32,
                          lambda v: setattr(torch.backends.cuda.matmul, "allow_tf32", v)),
    "cudnn.allow_tf32": (lambda: torch.backends.cudnn.allow_tf32,
                         lambda v: setattr(torch.backends.cudnn, "allow_tf32", v)),
    "cudnn.deterministic": (lambda: torch.backends.cudnn.deterministic,
                            lambda v: setattr(torch.backends.cudnn, "deterministic", v)),
    "cudnn.benchmark": (lambda: torch.backends.cudnn.benchmark,
                        lambda v: setattr(torch.backends.cudnn, "benchmark", v)),
    "deterministic_algorithms": (
        lambda: (torch.are_deterministic_algorithms_enabled(),
                 torch.is_deterministic_algorithms_warn_only_enabled()),
        lambda v: torch.use_deterministic_algorithms(v[0], warn_only=v[1])),
}


def _set_flag(name: str, value: Any) -> None:
    _FLAGS[name][1](value)


def _change(numerics: Numerics, name: str, value: Any) -> None:
    numerics.saved.setdefault(name, _FLAGS[name][0]())
    _set_flag(name, value)


def apply_numerics(*, tf32: bool, deterministic: bool) -> Numerics:
    """Turn on TF32 and/or deterministic algorithms for this run; nothing changes when both
    are off.

    TF32 (Ampere and newer: A100, L4, H100, RTX 30xx+) runs fp32 matmuls and convolutions on
    tensor cores with a 10-bit mantissa: much faster fp32 work, about 3 significant digits
    per product. Older GPUs and the CPU ignore it.

    Deterministic mode picks deterministic kernels (cuDNN without autotuning, cuBLAS with a
    fixed workspace) so the same seed repeats the same run. Operations that have no
    deterministic kernel warn instead of failing (the UNet's upsampling backward on CUDA is
    one), so on a GPU a run is repeatable only as far as those allow; on the CPU it is exact.
    """
    numerics = Numerics()
    if tf32:
        _change(numerics, "matmul.allow_tf32", True)
        _change(numerics, "cudnn.allow_tf32", True)
    if deterministic:
        if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
            numerics.env["CUBLAS_WORKSPACE_CONFIG"] = None
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
        _change(numerics, "cudnn.deterministic", True)
        _change(numerics, "cudnn.benchmark", False)
        _change(numerics, "deterministic_algorithms", (True, True))
    return numerics


def half_model_dtype(full_fp16: bool, mixed_precision: str) -> torch.dtype | None:
    """The dtype the trained weights are cast to for the Half model option, or None.

    fp16 mixed precision gives fp16 weights, bf16 gives bf16; without mixed precision (the
    CPU, or "no") the option does nothing and a warning says so.
    """
    if not full_fp16:
        return None
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision)
    if dtype is None:
        log.warning("Half model needs a GPU with fp16 or bf16 mixed precision: training the "
                    "weights in fp32")
    return dtype


def allow_fp16_gradient_unscale(accelerator) -> None:
    """Let accelerate's fp16 gradient scaler unscale fp16 gradients (the half model's own).

    torch's GradScaler refuses them by default because fp16 gradients may overflow while
    being unscaled; with the half model that is the accepted risk (a step with inf/nan
    gradients is skipped by the scaler as usual).
    """
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        return
    original = scaler._unscale_grads_

    def unscale(optimizer, inv_scale, found_inf, allow_fp16):  # noqa: ARG001 - torch's API
        return original(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale


def warn_fp16_optimizer_state(optimizer: torch.optim.Optimizer, dtype: torch.dtype | None) -> bool:
    """Warn when the half model's fp16 weights meet an optimizer that keeps fp16 state.

    torch's AdamW and Prodigy keep their moments in the parameters' dtype: in fp16 small
    second moments underflow to 0 and an epsilon of 1e-8 rounds to 0, so a step can divide by
    zero. bitsandbytes' 8-bit optimizers and Adafactor compute in fp32, and Lion has no
    division. Returns True when it warned.
    """
    if dtype != torch.float16:
        return False
    cls = type(optimizer)
    safe = cls.__module__.startswith("bitsandbytes") or cls.__name__ in ("Adafactor", "Lion")
    if not safe:
        log.warning("Half model with the %s optimizer keeps its state in fp16, where small "
                    "values underflow and steps may turn to inf/NaN: prefer Use 8bit Adam, "
                    "Adafactor or Lion with Half model", cls.__name__)
    return not safe
