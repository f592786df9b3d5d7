"""Group-wise integer quantization and Matryoshka bit-slicing (AMAT).

Weights are quantized along their last (input) dimension in groups. Codes are always stored
unsigned: the asymmetric quantizer has a per-group zero-point, the symmetric one the fixed
zero-point 2^(b-1) (offset binary). Keeping both unsigned makes the MSB/LSB split a plain
shift for either, and makes `trunc` vs `amat` differ only in what happens to the zero-point.

MAT(h, l): the high-bit code q (h bits) splits into an MSB slice q >> (h-l) and an LSB slice
q & (2^(h-l)-1). Schemes for the low (MSB-only) path:
- amat:  zero-point truncated together with q, scale multiplied by 2^(h-l)
- trunc: q truncated, zero-point kept at the high-bit value (what naive slicing gives)
- base:  the weights quantized independently at l bits (needs its own copy; the reference)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEMES = ("amat", "trunc", "base")
SCALE_BITS = 16  # scales are stored as fp16
# The bits-independent unit of cache sizes (cache.frac) and of miss_rate_refn: every routed
# weight at 8 bits, no metadata. Sizing by each configuration's own high-bit bytes instead would
# give fp16 experts 4x the DRAM of MAT42 for the same `frac`.
REFERENCE_BITS = 8


def reference_bytes(n_params: int) -> int:
    return n_params * REFERENCE_BITS // 8


@dataclass
class QTensor:
    q: torch.Tensor  # uint8 codes, shape (..., n_in)
    scale: torch.Tensor  # float32, shape (..., n_in // group)
    zp: torch.Tensor  # float32 (integer valued), shape (..., n_in // group)
    bits: int
    group: int
    symmetric: bool

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = self.q.float().unflatten(-1, (-1, self.group))
        w = (g - self.zp.unsqueeze(-1)) * self.scale.unsqueeze(-1)
        return w.flatten(-2).to(dtype)


def _check(bits: int, group: int, n_in: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits} is out of range; use 2..8")
    if n_in % group:
        raise ValueError(f"input dim {n_in} is not divisible by group={group}; pick a divisor")


def quantize(w: torch.Tensor, bits: int, group: int = 32, symmetric: bool = False) -> QTensor:
    """Round-to-nearest min-max quantization per group of `group` inputs."""
    _check(bits, group, w.shape[-1])
    g = w.detach().float().unflatten(-1, (-1, group))
    qmax = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        scale = g.abs().amax(-1) / (half - 1)
        zp = torch.full_like(scale, float(half))
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        scale = (hi - lo) / qmax
        zp = torch.round(-lo / scale.clamp_min(1e-12)).clamp(0, qmax)
    # A constant group would give scale 0; any positive scale represents it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(g / scale.unsqueeze(-1)) + zp.unsqueeze(-1)
    q = q.clamp(0, qmax).to(torch.uint8).flatten(-2)
    return QTensor(q, scale, zp, bits, group, symmetric)


def msb(qt: QTensor, low_bits: int) -> torch.Tensor:
    return qt.q >> (qt.bits - low_bits)


def lsb(qt: QTensor, low_bits: int) -> torch.Tensor:
    return qt.q & ((1 << (qt.bits - low_bits)) - 1)


def join(msb_codes: torch.Tensor, lsb_codes: torch.Tensor, high_bits: int, low_bits: int):
    """MSB + LSB -> the high-bit code, bit-exact."""
    return (msb_codes << (high_bits - low_bits)) | lsb_codes


def low_path(w: torch.Tensor | None, qt: QTensor, low_bits: int, scheme: str) -> QTensor:
    """The l-bit tensor the low (MSB-only) path computes with under `scheme`."""
    if not low_bits < qt.bits:
        raise ValueError(f"low bits {low_bits} must be < high bits {qt.bits}")
    shift = qt.bits - low_bits
    if scheme == "amat":
        zp = torch.floor(qt.zp / 2**shift)
    elif scheme == "trunc":
        zp = qt.zp
    elif scheme == "base":
        if w is None:
            raise ValueError("scheme 'base' re-quantizes the original weights; pass w")
        return quantize(w, low_bits, qt.group, qt.symmetric)
    else:
        raise ValueError(f"bits.scheme={scheme!r} is unknown; choose one of {SCHEMES}")
    return QTensor(msb(qt, low_bits), qt.scale * 2**shift, zp, low_bits, qt.group, qt.symmetric)


def tensor_bytes(n_params: int, bits: int, group: int, symmetric: bool) -> int:
    """Bytes of `n_params` codes at `bits` plus per-group metadata.

    Metadata per group: an fp16 scale and, for asymmetric slices, a zero-point stored at the
    slice's own bit width. Totals are rounded up to whole bytes once per tensor.
    """
    groups = n_params // group
    meta_bits = groups * (SCALE_BITS + (0 if symmetric else bits))
    return -(-(n_params * bits + meta_bits) // 8)


def slice_bytes(
    n_params: int, high: int | None, low: int | None, group: int, symmetric: bool, fp16: int = 0
):
    """Bytes of the slices of one expert holding `n_params` weights (high=None: fp16 experts),
    plus `fp16` parameters (biases) kept at 16 bits in every slice that computes (MSB, FULL).

    Returns {"FULL": high-bit bytes, "MSB": low slice with its metadata, "LSB": the remaining
    bits}. The LSB slice carries no metadata of its own: the high path uses the high-bit scale
    and zero-point, which are the MSB slice's scale / 2^shift and a zero-point whose low bits
    ride in the LSB slice (one extra (h-l)-bit value per group for asymmetric quantizers).
    """
    extra = 2 * fp16
    if high is None:
        return {"FULL": 2 * n_params + extra, "MSB": 2 * n_params + extra, "LSB": 0}
    full = tensor_bytes(n_params, high, group, symmetric) + extra
    if low is None:
        return {"FULL": full, "MSB": full, "LSB": 0}
    groups = n_params // group
    lsb_bits = n_params * (high - low) + (0 if symmetric else groups * (high - low))
    return {
        "FULL": full,
        "MSB": tensor_bytes(n_params, low, group, symmetric) + extra,
        "LSB": -(-lsb_bits // 8),
    }
