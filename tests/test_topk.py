"""The routers' top-k in one kernel (slicemoe.kernels.topk) gives a stable descending sort's
first k indices (on CUDA, or on the CPU through Triton's interpreter), as torch.topk does
wherever no scores are equal; routing takes it for CUDA tensors."""

from __future__ import annotations

import pytest
import torch

from slicemoe.kernels.topk import reference, topk_indices

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    "shape,k,dtype",
    [((7, 6), 2, torch.float32), ((33, 60), 4, torch.float32), ((5, 64), 8, torch.bfloat16),
     ((2, 3, 160), 6, torch.float32), ((4, 60), 60, torch.float32)],
)  # fmt: skip
def test_the_kernel_gives_a_stable_descending_sorts_first_k(shape, k, dtype):
    g = torch.Generator().manual_seed(k)
    # Scores from a few values: many ties, at the k-th place too; -inf as masked experts get.
    x = torch.randint(-3, 4, shape, generator=g).float()
    x[x == -3] = float("-inf")
    x = x.to(DEVICE, dtype)
    got = topk_indices(x, k)
    assert got.dtype == torch.int64 and got.shape == (*shape[:-1], k)
    assert torch.equal(got, reference(x, k))


def test_the_kernel_gives_torch_topk_where_no_scores_are_equal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 128, generator=g).to(DEVICE)[:, ::2]  # a strided view
    assert torch.equal(topk_indices(x, 4), x.topk(4, dim=-1).indices)


def test_nan_ranks_first_as_in_torch_sort():
    x = torch.tensor([[0.5, float("nan"), 2.0, float("-inf"), float("nan"), 1.0]]).to(DEVICE)
    assert topk_indices(x, 4).tolist() == [[1, 4, 2, 5]] == reference(x, 4).tolist()
