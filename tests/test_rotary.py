"""Rotary embedding in one kernel (slicemoe.kernels.rotary) computes the common formula bit for
bit (on CUDA, or on the CPU through Triton's interpreter); only a family's function that
computes it is replaced, and a call the kernel does not cover (off CUDA, not bfloat16) gets the
family's own."""

from __future__ import annotations

import sys

import pytest
import torch

from slicemoe.kernels.rotary import computes_standard, covers, fuse, rotary, standard

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    "b,hq,hk,s,d,cos_rows", [(3, 4, 2, 1, 16, 3), (2, 4, 4, 5, 32, 1), (1, 2, 1, 7, 64, 1)]
)
def test_the_kernel_computes_the_common_formula(b, hq, hk, s, d, cos_rows):
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    # As attention makes them: [B, S, H, D] projections seen as [B, H, S, D].
    q = torch.randn((b, s, hq, d), generator=g).to(DEVICE, dtype).transpose(1, 2)
    k = torch.randn((b, s, hk, d), generator=g).to(DEVICE, dtype).transpose(1, 2)
    angle = 10 * torch.randn((cos_rows, s, d), generator=g)
    cos, sin = angle.cos().to(DEVICE, dtype), angle.sin().to(DEVICE, dtype)
    got, want = rotary(q, k, cos, sin), standard(q, k, cos, sin)
    for x, y in zip(got, want):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    # The kernel takes bfloat16 CUDA calls only: float32 (where the compiler would fuse
    # products and sums) and anything off CUDA are the family's to compute.
    assert covers(q, k, cos, sin, 1) == (DEVICE == "cuda")
    assert not covers(*(t.float() for t in (q, k, cos, sin)), 1)


def _interleaved(q, k, cos, sin, unsqueeze_dim=1):
    """GLM's and GPT-J's rotary: pairs of neighbours, not halves."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rotate(x):
        return torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)

    return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin


def test_only_a_function_computing_the_common_formula_is_replaced(monkeypatch):
    from test_code_experts import model as qwen

    model = qwen()
    module = sys.modules[type(model).__module__]
    fused_before = module.apply_rotary_pos_emb  # a model loaded on CUDA earlier fused it
    own = getattr(fused_before, "_slicemoe_own", fused_before)
    monkeypatch.setattr(module, "apply_rotary_pos_emb", own)  # put back after the test
    assert computes_standard(own) and not computes_standard(_interleaved)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
        assert fuse(model) and fuse(model)  # the second call finds it done
        assert module.apply_rotary_pos_emb is not own
        assert module.apply_rotary_pos_emb._slicemoe_own is own
        assert torch.equal(model(ids).logits, before)  # off CUDA: the family's own
    monkeypatch.setattr(module, "apply_rotary_pos_emb", _interleaved)
    assert not fuse(model) and module.apply_rotary_pos_emb is _interleaved
