"""Rotary embedding in one kernel (slicemoe.kernels.rotary) computes the common formula (on
CUDA, or on the CPU through Triton's interpreter); only a family's function that computes it is
replaced, and a call the kernel does not cover (here: off CUDA) gets the family's own."""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():  # the kernel runs through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from slicemoe.kernels.rotary import computes_standard, fuse, rotary, standard

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    "b,hq,hk,s,d,cos_rows,dtype",
    [(3, 4, 2, 1, 16, 3, torch.bfloat16), (2, 4, 4, 5, 32, 1, torch.bfloat16),
     (2, 2, 1, 3, 16, 2, torch.float32)],
)  # fmt: skip
def test_the_kernel_computes_the_common_formula(b, hq, hk, s, d, cos_rows, dtype):
    g = torch.Generator().manual_seed(0)
    # As attention makes them: [B, S, H, D] projections seen as [B, H, S, D].
    q = torch.randn((b, s, hq, d), generator=g).to(DEVICE, dtype).transpose(1, 2)
    k = torch.randn((b, s, hk, d), generator=g).to(DEVICE, dtype).transpose(1, 2)
    angle = 10 * torch.randn((cos_rows, s, d), generator=g)
    cos, sin = angle.cos().to(DEVICE, dtype), angle.sin().to(DEVICE, dtype)
    got, want = rotary(q, k, cos, sin), standard(q, k, cos, sin)
    for x, y in zip(got, want):
        assert x.dtype == y.dtype and x.shape == y.shape
        if DEVICE == "cuda":
            assert torch.equal(x, y)
        else:  # Triton's interpreter truncates to bfloat16 where CUDA rounds to nearest
            unit = torch.finfo(dtype).eps
            torch.testing.assert_close(x, y, rtol=2 * unit, atol=2 * unit)


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
    own = module.apply_rotary_pos_emb
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
