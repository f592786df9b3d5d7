"""The routers' top-k in one kernel on CUDA: each row's k largest scores' indices, best first,
equal scores by the lower index (the order of a stable descending sort, which `reference`
writes out). torch.topk's kernels took 0.58 ms of a 19.2-ms decode step at B=128 on an H200
(Qwen1.5-MoE shape, 24 layers, [128, 60] scores a layer); here one program a row picks the k in
k passes over the row, held in registers: the recorded step 22.81 -> 22.37 ms at B=128 and
5.42 -> 5.15 ms at B=1 on an H100 (benchmarks/README.md, the seventh round).

`topk_indices` runs the kernel for rows of up to MAX_ITEMS scores (on the CPU through Triton's
interpreter, for tests), torch.topk for longer ones; slicemoe.routing calls it for CUDA tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ITEMS = 1024  # scores a row held in one program's registers
# One warp a row: Qwen1.5-MoE's 60 scores are two a lane of its 32, and its reductions need no
# shared memory (the recorded step at B=128 19.40 -> 19.31 ms on an H100 against four warps).
WARPS = 1


# One build for any row count and layout (a pass's first batches must not compile another).
@triton.jit(do_not_specialize=["N", "stride"])
def _topk(x_ptr, idx_ptr, N, stride, K: tl.constexpr, BN: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BN)
    x = tl.load(x_ptr + row * stride + cols, mask=cols < N, other=0.0).to(tl.float32)
    nan = x != x
    left = cols < N  # not yet taken
    for j in tl.static_range(K):
        # NaN ranks above every number, as in torch.sort and torch.topk
        nan_left = left & nan
        best = tl.max(tl.where(left & ~nan, x, float("-inf")), 0)
        pick = tl.where(tl.max(nan_left.to(tl.int32), 0) > 0, nan_left, left & (x == best))
        at = tl.min(tl.where(pick, cols, BN), 0)
        tl.store(idx_ptr + row * K + j, at.to(tl.int64))
        left = left & (cols != at)


def reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """The indices `topk_indices` gives, the plain way: a stable descending sort's first k."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., k] of the k largest of each row of `x` [..., N], best first."""
    n = x.shape[-1]
    if n > MAX_ITEMS or not 0 < k <= n:
        return x.topk(k, dim=-1).indices
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((len(rows), k), dtype=torch.int64, device=x.device)
    if len(rows):
        _topk[(len(rows),)](
            rows, out, n, rows.stride(0), K=k, BN=triton.next_power_of_2(n), num_warps=WARPS
        )
    return out.view(*x.shape[:-1], k)
