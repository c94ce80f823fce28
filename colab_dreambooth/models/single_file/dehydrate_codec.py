"""The dehydrate codec: what to store of one trained tensor, given its base tensor, and how to
rebuild it.

Lossless kinds: ``same`` (nothing), ``sparse`` (the changed elements: index + value), ``delta``
(trained - base in the trained dtype, kept only when base + delta gives the trained tensor back
bit for bit) and ``full`` (the trained tensor). In low-rank mode a matrix or convolution kernel
whose change is cheaper as factors is stored as ``lowrank``: the truncated SVD of its change,
``U`` (fp16) ``S`` (fp32) ``Vh`` (fp16); the encoder keeps the resulting error totals.
"""

from __future__ import annotations

import math

import torch

from colab_dreambooth.models.low_rank import top_singular
from colab_dreambooth.safetensors_stream import element_size

LOSSLESS, LOWRANK = "lossless", "lowrank"

# Rank 128 in fp16 factors: SD 1.5's UNet ~270 MB, its text encoder ~45 MB, so even a model
# with a trained text encoder and an EMA UNet stays under 1 GB (~0.6 GB).
DEFAULT_RANK = 128

FACTOR_DTYPE = torch.float16  # U and Vh have orthonormal columns/rows: |entries| <= 1, no overflow

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

PARTS = {"full": ("full",), "same": (), "delta": ("delta",), "sparse": ("index", "value"),
          "lowrank": ("U", "S", "Vh")}


class TensorEncoder:
    """Chooses and builds what to store per tensor, and keeps the error and size totals."""

    def __init__(self, rank: int | None, device: torch.device):
        self.rank = rank
        self.device = device
        self.stored_bytes: dict[str, int] = {}
        self._sums: dict[str, list[float]] = {}  # sub -> [|t - rebuilt|^2, |t - b|^2, |t|^2]

    def encode(self, sub: str, t: torch.Tensor, b: torch.Tensor | None
               ) -> tuple[str, dict[str, torch.Tensor]]:
        """(kind, parts) for trained tensor ``t`` over base tensor ``b``."""
        kind, parts = encode_exact(t, b)
        sums = self._sums.setdefault(sub, [0.0, 0.0, 0.0])
        if self.rank is None:
            return kind, parts
        comparable = b is not None and b.shape == t.shape and t.is_floating_point()
        if comparable:
            change = t.float() - b.float()
            sums[1] += _sq(change)
            sums[2] += _sq(t.float())
            if kind != "same" and t.ndim >= 2:
                factored = self._factor(t, b, change, _nbytes(parts))
                if factored is not None:
                    parts, rebuilt = factored
                    sums[0] += _sq(t.float() - rebuilt.float())
                    return "lowrank", parts
        elif t.is_floating_point():
            sums[2] += _sq(t.float())
        return kind, parts

    def _factor(self, t, b, change, exact_bytes: int):
        m = t.shape[0]
        n = t.numel() // m
        k = min(self.rank, m, n)
        factor_bytes = k * (m + n) * element_size(FACTOR_DTYPE) + 4 * k
        if factor_bytes >= exact_bytes or not torch.isfinite(change).all():
            return None  # exact storage is no bigger (or the change is not finite): keep exact
        u, s, vh = top_singular(change.reshape(m, n).to(self.device), k)
        u, s, vh = u.cpu(), s.cpu(), vh.cpu()
        parts = {"U": u.to(FACTOR_DTYPE), "S": s.float(), "Vh": vh.to(FACTOR_DTYPE)}
        return parts, _apply_lowrank(b, parts, t.shape, t.dtype)

    def add_stored(self, sub: str, nbytes: int) -> None:
        """Count ``nbytes`` more stored for sub-model ``sub``."""
        self.stored_bytes[sub] = self.stored_bytes.get(sub, 0) + nbytes

    def errors(self) -> tuple[dict[str, float], dict[str, float]]:
        """Relative errors of the change and of the weights, per sub-model and overall."""
        of_change, of_weights = {}, {}
        rows = dict(self._sums)
        rows["overall"] = [sum(v[i] for v in self._sums.values()) for i in range(3)]
        for sub, (err, change, weights) in rows.items():
            of_change[sub] = math.sqrt(err / change) if change else 0.0
            of_weights[sub] = math.sqrt(err / weights) if weights else 0.0
        return of_change, of_weights


def encode_exact(t: torch.Tensor, b: torch.Tensor | None) -> tuple[str, dict[str, torch.Tensor]]:
    """Lossless: nothing, changed elements, a verified delta, or the trained tensor itself."""
    if b is None or b.shape != t.shape:
        return "full", {"full": t}
    bc = b.to(t.dtype)
    changed = _bits(t) != _bits(bc)
    count = int(changed.sum())
    if count == 0:
        return "same", {}
    index_dtype = torch.int32 if t.numel() < 2**31 else torch.int64
    if count * (t.element_size() + element_size(index_dtype)) < t.numel() * t.element_size():
        index = changed.reshape(-1).nonzero().squeeze(1)
        return "sparse", {"index": index.to(index_dtype), "value": t.reshape(-1)[index]}
    if t.is_floating_point():
        delta = t - bc
        # Not every subtraction is undone by the addition (fp16 rounds often): verify each one.
        if torch.equal(_bits(bc + delta), _bits(t)):
            return "delta", {"delta": delta}
    return "full", {"full": t}


def _apply_lowrank(b: torch.Tensor, parts: dict[str, torch.Tensor], shape, dtype) -> torch.Tensor:
    """base + U diag(S) Vh, in float32, cast to the trained dtype (dehydrate measures this)."""
    change = (parts["U"].float() * parts["S"].float()) @ parts["Vh"].float()
    return (b.float() + change.reshape(shape)).to(dtype)


def decode(kind: str, parts: dict[str, torch.Tensor], b: torch.Tensor | None, shape,
            dtype: torch.dtype) -> torch.Tensor:
    """Rebuild a trained tensor from what was stored and the base tensor."""
    if kind == "full":
        return parts["full"]
    if b is None:
        raise KeyError("the base tensor")
    if kind == "same":
        return b.to(dtype)
    if kind == "delta":
        return b.to(dtype) + parts["delta"]
    if kind == "sparse":
        t = b.to(dtype, copy=True).reshape(-1)
        t[parts["index"].long()] = parts["value"]
        return t.reshape(shape)
    if kind == "lowrank":
        return _apply_lowrank(b, parts, shape, dtype)
    raise KeyError(f"unknown kind {kind!r}")


def _sq(x: torch.Tensor) -> float:
    """Squared Frobenius norm, summed in float64."""
    return float(torch.sum(x.square(), dtype=torch.float64))


def _nbytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in parts.values())


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor reinterpreted as integers of its width: compares NaNs and -0.0 bit for bit."""
    return tensor.contiguous().view(_BITS[tensor.element_size()])


__all__ = ["LOSSLESS", "LOWRANK", "DEFAULT_RANK", "FACTOR_DTYPE", "PARTS", "TensorEncoder",
           "encode_exact", "decode"]
