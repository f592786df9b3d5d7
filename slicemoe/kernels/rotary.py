"""Rotary position embedding of queries and keys in one kernel on CUDA, where a family applies
the common formula (`standard`): x cos + rotate_half(x) sin, each product rounded to the
dtype as PyTorch rounds it. PyTorch runs the formula as five kernels a tensor (two products,
a negation, a concatenation, a sum), ten a layer; here it is one, with identical output.

The families call a module-level `apply_rotary_pos_emb` from their attention's forward, so
`fuse(model)` replaces that function in the model's module where it computes `standard`
exactly on a probe. The replacement computes here only what this kernel covers (bfloat16 CUDA
tensors outside compilation, cos and sin [B, S, D] broadcast over the heads) and hands anything
else to the family's own function: other models of the family in the process get the same
outputs.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl


@triton.jit
def _bf16(v):
    """float32 `v` rounded to the nearest bfloat16 (ties to even), as a float32. Integer
    operations, not a conversion: the compiler would fuse a product rounded by conversion
    with the sum after it into one fma, which rounds once where PyTorch rounds twice."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))


@triton.jit
def _rotate(x_ptr, out_ptr, c, s, d, D: tl.constexpr):
    half = D // 2
    x = tl.load(x_ptr + d).to(tl.float32)
    partner = tl.load(x_ptr + tl.where(d < half, d + half, d - half)).to(tl.float32)
    rotated = tl.where(d < half, -partner, partner)
    # (each rounding by `_bf16`: also exact where Triton's interpreter truncates conversions)
    tl.store(out_ptr + d, _bf16(_bf16(x * c) + _bf16(rotated * s)).to(tl.bfloat16))


# Lengths and the strides they scale are not specialised on: one variant for every step and piece.
@triton.jit(do_not_specialize=["S", "q_b", "k_b", "c_b"])
def _rotary(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, S, q_b, q_h, q_s, k_b, k_h, k_s,
            c_b, c_s, HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr):  # fmt: skip
    """Program (token b * S + s, head h of the queries' HQ then the keys' HK): that head's
    vector at position s, written to the contiguous [B, H, S, D] output."""
    token = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    b = token // S
    s = token % S
    d = tl.arange(0, D)
    c = tl.load(cos_ptr + b * c_b + s * c_s + d).to(tl.float32)
    sn = tl.load(sin_ptr + b * c_b + s * c_s + d).to(tl.float32)
    if h < HQ:
        _rotate(q_ptr + b * q_b + h * q_h + s * q_s, qo_ptr + ((b * HQ + h) * S + s) * D,
                c, sn, d, D)  # fmt: skip
    else:
        hk = h - HQ
        _rotate(k_ptr + b * k_b + hk * k_h + s * k_s, ko_ptr + ((b * HK + hk) * S + s) * D,
                c, sn, d, D)  # fmt: skip


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """`standard(q, k, cos, sin)` in one kernel: q [B, HQ, S, D], k [B, HK, S, D], cos and sin
    [B, S, D], all bfloat16, D a power of two, the last dimension of each contiguous."""
    b, hq, s, d = q.shape
    hk = k.shape[1]
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    cos = cos.expand(b, s, d)
    sin = sin.expand(b, s, d)
    if q.numel() and k.numel():
        _rotary[(b * s, hq + hk)](
            q, k, cos, sin, qo, ko, s, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
            k.stride(1), k.stride(2), cos.stride(0), cos.stride(1), HQ=hq, HK=hk, D=d,
        )  # fmt: skip
    return qo, ko


def standard(q, k, cos, sin, unsqueeze_dim: int = 1):
    """The common rotary embedding (Llama's, Qwen's) in PyTorch."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def covers(q, k, cos, sin, unsqueeze_dim) -> bool:
    """Whether `rotary` computes this call (anything else goes to the family's function)."""
    if unsqueeze_dim != 1 or not q.is_cuda or torch.compiler.is_compiling():
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    d = q.shape[-1]
    if k.shape[-1] != d or cos.shape[-1] != d or d & (d - 1) or k.shape[0] != q.shape[0]:
        return False
    if (
        k.shape[2] != q.shape[2]
        or cos.shape[1] != q.shape[2]
        or cos.shape[0] not in (1, q.shape[0])
    ):
        return False
    same = {q.dtype, k.dtype, cos.dtype, sin.dtype}
    return same == {torch.bfloat16} and all(t.stride(-1) == 1 for t in (q, k, cos, sin))


@torch.no_grad()
def computes_standard(fn) -> bool:
    """Whether the family's `apply_rotary_pos_emb` computes `standard`, exactly, on a probe."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn((2, 4, 3, 16), generator=g), torch.randn((2, 2, 3, 16), generator=g)
    angle = torch.randn((2, 3, 16), generator=g)
    probe = [t.to(torch.bfloat16) for t in (q, k, angle.cos(), angle.sin())]
    try:
        got = fn(*probe)
    except Exception:  # another signature: no common rotary
        return False
    want = standard(*probe)
    return isinstance(got, tuple) and len(got) == 2 and all(map(torch.equal, got, want))


def fuse(model) -> bool:
    """Replace the `apply_rotary_pos_emb` of `model`'s module with one computed by `rotary`
    where it covers the call, if that function `computes_standard`: whether it is now."""
    module = sys.modules[type(model).__module__]
    own = getattr(module, "apply_rotary_pos_emb", None)
    if own is None or getattr(own, "_slicemoe_own", None) is not None:
        return own is not None
    if not computes_standard(own):
        return False

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if covers(q, k, cos, sin, unsqueeze_dim):
            return rotary(q, k, cos, sin)
        return own(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb._slicemoe_own = own
    module.apply_rotary_pos_emb = apply_rotary_pos_emb
    return True
