"""A model's RMSNorm in one kernel (slicemoe.kernels.rms_norm) computes the common formula (on
CUDA, or on the CPU through Triton's interpreter); only norms that compute that formula are
swapped, and off CUDA a swapped norm is the model's own."""

from __future__ import annotations

import pytest
import torch

from slicemoe.kernels.rms_norm import computes_standard, fuse, rms_norm, standard

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    "shape,dtype,wdtype",
    [((5, 64), torch.bfloat16, torch.bfloat16), ((2, 3, 80), torch.bfloat16, torch.float32),
     ((4, 96), torch.float32, torch.float32)],
)  # fmt: skip
def test_the_kernel_computes_the_common_formula(shape, dtype, wdtype):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=g)).to(DEVICE, dtype)
    w = torch.randn(shape[-1], generator=g).to(DEVICE, wdtype)
    got, want = rms_norm(x, w, 1e-6), standard(x, w, 1e-6)
    assert got.dtype == want.dtype and got.shape == want.shape
    # the mean's sum in another order, then a rounding to the input's dtype: within a unit of
    # it (Triton's interpreter truncates where CUDA rounds to nearest)
    unit = torch.finfo(dtype).eps
    torch.testing.assert_close(got, want, rtol=2 * unit, atol=1e-6)


class _OffsetRMSNorm(torch.nn.Module):
    """Gemma's: the weight stored as an offset from one."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n))
        self.eps = 1e-6

    def forward(self, x):
        return standard(x, 1.0 + self.weight, self.eps)


class _GatedRMSNorm(_OffsetRMSNorm):
    """Mamba's: the common formula without a gate, gated with one."""

    def forward(self, x, gate=None):
        y = standard(x, self.weight, self.eps)
        return y if gate is None else y * torch.sigmoid(gate)


def test_only_norms_that_compute_the_common_formula_are_swapped():
    from test_code_experts import model as qwen

    model = qwen()  # two layers, hidden size 64
    model.model.extra = _OffsetRMSNorm(64)
    model.model.gated = _GatedRMSNorm(64)
    assert not computes_standard(model.model.extra) and not computes_standard(model.model.gated)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
        assert fuse(model) == 2 * 2 + 1  # two a layer and the final one
        assert type(model.model.norm).__name__ == "FusedQwen2MoeRMSNorm"
        assert (
            type(model.model.extra) is _OffsetRMSNorm and type(model.model.gated) is _GatedRMSNorm
        )
        assert torch.equal(model(ids).logits, before)  # off CUDA: the model's own norm
