"""The decode attention kernel (slicemoe.kernels.decode_attention) computes what SDPA computes
with the same additive mask, whatever slots the mask blocks, on CUDA or on the CPU through
Triton's interpreter."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed (CPU installs)"
)


def case(heads: int, kv_heads: int, dtype, device):
    """Three rows over 300 slots as the static KV cache holds them: a short left-padded prompt
    with its first decoded tokens, a long one whose later slots are still empty, a full row."""
    g = torch.Generator().manual_seed(0)
    b, s, d = 3, 300, 32
    q = torch.randn(b, heads, 1, d, generator=g)
    k = torch.randn(b, kv_heads, s, d, generator=g)
    v = torch.randn(b, kv_heads, s, d, generator=g)
    allowed = torch.zeros(b, s, dtype=torch.bool)
    allowed[0, 230:260] = True  # prompt, then decoded tokens
    allowed[1, 10:200] = allowed[1, 250] = True
    allowed[2] = True
    mask = torch.where(allowed[:, None, None], 0.0, torch.finfo(dtype).min)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, mask)]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("splits", [1, 2, 5])
def test_the_kernel_attends_as_sdpa_does(heads, kv_heads, splits):
    from slicemoe.kernels.decode_attention import decode_attention

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    q, k, v, mask = case(heads, kv_heads, dtype, device)
    group = heads // kv_heads
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.repeat_interleave(group, 1).float(), v.repeat_interleave(group, 1).float(),
        attn_mask=mask.float(), scale=0.3,
    ).transpose(1, 2)  # fmt: skip
    got = decode_attention(q, k, v, mask, 0.3, splits=splits)
    assert got.shape == (3, 1, heads, 32) and got.dtype == dtype
    # float32 on the CPU; bf16 inputs on CUDA, the output rounded to bf16
    assert (got.float() - want).abs().max() < (1e-5 if not cuda else 2e-2)


def test_splits_keep_every_sm_busy_and_take_whole_blocks():
    from slicemoe.kernels.decode_attention import SPLIT_MIN, splits_for

    assert splits_for(1, 16, 1600, 132) == 7  # 1600 slots: at most 7 splits of 256
    assert splits_for(1, 16, 100_000, 132) == 33  # 4 programs per SM
    assert splits_for(164, 16, 1600, 132) == 1  # a large batch fills the GPU by itself
    assert splits_for(1, 16, SPLIT_MIN, 132) == 1
