"""Low-rank factors of a weight change: one truncated SVD for LoRA extraction and dehydrate's
low-rank changes, and kohya's ``lora_up``/``lora_down`` factors made from it.

Through the eigenvectors of the smaller side's Gram matrix ``x @ x.T`` rather than LAPACK's
full SVD: several times faster on a 2-core CPU (9.2 s vs 1.2 s for SD 1.5's 1280 x 11520
conv kernel on one thread) and as exact for the top singular vectors. In float32 it resolves
singular values down to ~1e-3 of the largest (enough for fp16 factors); in float64 to ~1e-8
(float32 factors). The signs of the vectors may differ from ``torch.linalg.svd``'s;
``U diag(S) Vh`` does not.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch


def default_device() -> torch.device:
    """Where SVDs run unless told: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def top_singular(matrix: torch.Tensor, rank: int, *, dtype: torch.dtype = torch.float32
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``rank`` singular triplets ``U, S, Vh`` of ``matrix`` (2-D), computed on its
    device in ``dtype`` and returned in float32 there.

    ``U diag(S) Vh`` is the projection of the matrix on its top-``rank`` singular subspace (at
    full rank, the matrix itself): the right factor is ``U^T x`` with its rows normalised.
    """
    x = matrix.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    gram = x @ x.T
    with _one_cpu_thread(x.device):
        try:
            _, q = torch.linalg.eigh(gram)  # eigenvalues ascending
        except RuntimeError:  # float32 did not converge (rare): float64 does
            _, q = torch.linalg.eigh(gram.double())
    u = q[:, -rank:].flip(1).to(x.dtype)
    w = u.T @ x  # rows: s_i * v_i
    s = torch.linalg.vector_norm(w, dim=1)
    vh = torch.where(s[:, None] > 0, w / s.clamp_min(torch.finfo(s.dtype).tiny)[:, None], 0.0)
    if tall:  # x was the matrix's transpose: its V is the matrix's U
        u, vh = vh.T, u.T
    return u.float().contiguous(), s.float(), vh.float().contiguous()


def low_rank_factors(delta: torch.Tensor, rank: int, clamp_quantile: float = 0.99
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` with ``up @ down`` ~ ``delta``, as kohya computes them (in fp32).

    ``delta`` is a Linear weight change (out x in) or a Conv2d one (out x in x kh x kw; then
    ``up`` is out x r x 1 x 1 and ``down`` r x in x kh x kw, kohya's LoCon layout). The rank is
    capped at the layer's smaller side; both factors are clamped to ``[-q, q]`` where ``q`` is
    the ``clamp_quantile`` of their values (1.0: no clamping).
    """
    out_dim, in_dim = delta.shape[:2]
    conv = delta.dim() == 4
    matrix = delta.reshape(out_dim, -1).float()
    rank = min(rank, in_dim, out_dim)
    # float64 on the CPU: float32 factors resolve what fp32 Gram matrices would round away.
    u, s, vh = top_singular(matrix, rank, dtype=torch.float64 if matrix.device.type == "cpu"
                            else torch.float32)
    up = u * s  # U @ diag(S) without the diagonal matrix
    down = vh
    if clamp_quantile < 1.0:
        high = _quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
        up, down = up.clamp(-high, high), down.clamp(-high, high)
    if conv:
        up = up.reshape(out_dim, rank, 1, 1)
        down = down.reshape(rank, *delta.shape[1:])
    return up.contiguous(), down.contiguous()


def pad_rank(up: torch.Tensor, down: torch.Tensor, rank: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad factors whose rank was capped (a layer narrower than ``rank``) up to ``rank``.

    ``up @ down`` is unchanged; every layer of a kind then has the same rank and alpha. kohya
    writes the capped rank as that layer's alpha, but diffusers' kohya loader (0.42) drops the
    alphas of attention layers that differ from the most common one and scales them wrongly.
    """
    missing = rank - down.shape[0]
    if missing <= 0:
        return up, down
    up = torch.cat([up, up.new_zeros(up.shape[0], missing, *up.shape[2:])], dim=1)
    down = torch.cat([down, down.new_zeros(missing, *down.shape[1:])], dim=0)
    return up, down


def relative_error(delta: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """``||delta - up @ down|| / ||delta||`` (Frobenius), in fp32."""
    matrix = delta.reshape(delta.shape[0], -1).float()
    approx = up.reshape(up.shape[0], -1).float() @ down.reshape(down.shape[0], -1).float()
    norm = float(torch.linalg.matrix_norm(matrix))
    return float(torch.linalg.matrix_norm(matrix - approx)) / norm if norm else 0.0


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile`` (linear interpolation), also above its 16M-element limit."""
    if values.numel() <= 2**24:
        return torch.quantile(values, q)
    position = q * (values.numel() - 1)
    low = math.floor(position)
    ordered = values.sort().values
    upper = ordered[min(low + 1, values.numel() - 1)]
    return ordered[low] + (upper - ordered[low]) * (position - low)


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run a CPU eigendecomposition on one thread.

    MKL's threaded eigh of a <=1280-wide matrix gains little on 2 cores and, when another
    process keeps a core busy, waits on its own threads: measured 1.5 s instead of 0.09 s per
    768-wide matrix, 19 instead of 5.4 minutes for SD 1.5 at rank 128.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


__all__ = ["default_device", "top_singular", "low_rank_factors", "pad_rank", "relative_error"]
