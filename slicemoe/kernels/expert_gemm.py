"""The routed experts of slicemoe.models.code_experts.CodeExperts as two grouped GEMMs that
dequantize their weights in the kernel: codes are read once per (expert, path) a batch uses, at
one byte per weight, and the high and the low path read the same codes.

The (token, slot) pairs are sorted by virtual expert and each expert's rows padded to whole
blocks of BM (`align`, plain tensor ops, so the whole forward can be captured in a CUDA graph);
a program computes one block of rows against one tile of output columns of that block's expert:
1. gate/up: h = silu(x W_gate^T) * (x W_up^T), both halves of the fused [2I, H] codes;
2. down: y = (h W_down^T) x the routing weight, written at the pair's own row, and the k rows
   of a token are summed afterwards (a fixed order: the same result on every run).
Weights are dequantized as quant.QTensor.dequantize does, w = (q >> shift - zp) x scale in
float32, rounded to the model's dtype; products accumulate in float32.

A prefill piece gives every expert thousands of rows: there, dequantizing a tile per block of
rows would repeat the work thousands of times, so the layer's used experts are dequantized once,
a chunk of experts at a time (`dequantize`, a kernel that writes the model's dtype), and the two
GEMMs are torch's grouped GEMM at tensor-core speed (`grouped`). Its outputs stay in expert
order; one kernel then weighs and sums each token's k of them (`_combine`, rounding where the
PyTorch epilogue it replaces rounds; the float32 sum's order may differ), so no pass over the
pairs' outputs is spent on scatters, products and sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Software-pipeline depth of the GEMMs (measured best on an H200 at Qwen1.5-MoE shape, and on an
# H100 for the wide gate/up tile, whose fourth stage left room for one program a multiprocessor).
STAGES = 3
# (token, slot) pairs per expert on average from which a call dequantizes the layer's experts
# once and runs torch's grouped GEMM (a prefill piece: thousands), rather than per tile.
GROUPED_ROWS = 256
CHUNK = 16  # virtual experts dequantized at a time by `grouped` (185 MB at Qwen1.5-MoE's shape)
# The pair counts (F, SIZE) differ between batches and are only compared with: not specialised
# on (Triton compiles a variant for each value divisible by 16, or not), so a pass compiles each
# kernel once rather than twice.


def reserved_rows(pairs: int, num_virtual: int, bm: int) -> int:
    """Rows `align` returns for `pairs` pairs: enough for any grouping (each used expert's
    padding at most bm - 1), whole blocks, the same for every step of a batch."""
    return -(-(pairs + min(num_virtual, pairs) * (bm - 1)) // bm) * bm


def align(v: torch.Tensor, num_virtual: int, bm: int):
    """Row order for the grouped GEMMs: (ids [P], block_expert [P // bm]). `ids` lists the flat
    (token, slot) indices of `v` grouped by virtual expert, in order within each, each group
    padded to a multiple of bm with the out-of-range index len(v); block b computes expert
    block_expert[b] (num_virtual: no expert, the program returns). A pair's place in its group
    is a running count of its expert (no sort: a few small kernels, as a decode step wants)."""
    f = v.numel()
    # One row per expert, so the running count runs along the contiguous dimension (CUDA's scan
    # over the outer one took 92 us a layer for 512 pairs on an H100).
    hits = v[None, :] == torch.arange(num_virtual, device=v.device)[:, None]
    seen = hits.cumsum(1, dtype=torch.int32)
    counts = (
        seen[:, -1].long() if f else torch.zeros(num_virtual, dtype=torch.int64, device=v.device)
    )
    rank = seen.gather(0, v[None, :])[0] - 1  # earlier pairs of the same expert
    padded = (counts + bm - 1) // bm * bm
    ends = padded.cumsum(0)
    size = reserved_rows(f, num_virtual, bm)
    ids = torch.full((size,), f, dtype=torch.int64, device=v.device)
    ids.scatter_(0, (ends - padded)[v] + rank, torch.arange(f, device=v.device))
    starts = torch.arange(0, size, bm, device=v.device)
    return ids, torch.searchsorted(ends, starts, right=True)


@triton.jit(do_not_specialize=["F", "SIZE"])
def _align(v_ptr, ids_ptr, block_ptr, F, SIZE, NV: tl.constexpr, BV: tl.constexpr,
           BM: tl.constexpr, BF: tl.constexpr):  # fmt: skip
    """`align` in one launch. Program e < NV: virtual expert e's pairs, in order, at its group's
    rows (after the padded groups of experts before it, from a histogram of all pairs), its
    padding and its blocks; program NV: the rows and blocks after the last group."""
    e = tl.program_id(0)
    bins = tl.arange(0, BV)
    counts = tl.zeros((BV,), dtype=tl.int32)
    f0 = 0
    while f0 < F:  # (a while loop: Triton's interpreter takes no runtime range bounds)
        j = f0 + tl.arange(0, BF)
        counts += tl.histogram(tl.load(v_ptr + j, mask=j < F, other=NV).to(tl.int32), BV)
        f0 += BF
    padded = tl.where(bins < NV, (counts + BM - 1) // BM * BM, 0)
    start = tl.sum(tl.where(bins < e, padded, 0))
    if e < NV:
        count = tl.sum(tl.where(bins == e, counts, 0))
        seen = start
        f0 = 0
        while f0 < F:
            j = f0 + tl.arange(0, BF)
            hit = tl.load(v_ptr + j, mask=j < F, other=NV) == e
            tl.store(ids_ptr + seen + tl.cumsum(hit.to(tl.int32), 0) - 1, j, mask=hit)
            seen += tl.sum(hit.to(tl.int32))
            f0 += BF
        end = start + (count + BM - 1) // BM * BM
        pad = seen + tl.arange(0, BM)
        tl.store(ids_ptr + pad, F, mask=pad < end)
    else:
        end = SIZE
        r0 = start
        while r0 < SIZE:
            r = r0 + tl.arange(0, BF)
            tl.store(ids_ptr + r, F, mask=r < SIZE)
            r0 += BF
    b0 = start // BM
    while b0 < end // BM:
        blocks = b0 + tl.arange(0, BF)
        tl.store(block_ptr + blocks, e, mask=blocks < end // BM)
        b0 += BF


def aligned(v: torch.Tensor, num_virtual: int, bm: int):
    """`align`'s output, identical, from one kernel launch instead of its ~19 small kernels."""
    f = v.numel()
    size = reserved_rows(f, num_virtual, bm)
    ids = torch.empty((size,), dtype=torch.int64, device=v.device)
    blocks = torch.empty((size // bm,), dtype=torch.int64, device=v.device)
    bv = triton.next_power_of_2(num_virtual + 1)  # a bin past the experts for masked lanes
    _align[(num_virtual + 1,)](v, ids, blocks, f, size, NV=num_virtual, BV=bv, BM=bm, BF=1024)
    return ids, blocks


@triton.jit
def _dequant(q_ptr, s_ptr, z_ptr, rows, k0, n_in, groups, shift, mult, G: tl.constexpr,
             BN: tl.constexpr, BK: tl.constexpr, row_ok):  # fmt: skip
    """Rows `rows` x columns k0 .. k0 + BK of a [out, n_in] weight; BK is a multiple of G, so
    each row's BK // G scales and zero-points are loaded once and broadcast over their group
    (a gather per weight instead runs twenty times slower).
    No shift and no integer-to-float conversion a weight, the products unchanged: the low
    path's code keeps its bits in place (q & mask is q >> shift times mult = 2^shift) and its
    zero-point is taken mult times too, where the scale was (a power of two moves no rounding);
    and a code c becomes the float 2^23 + c through its bits (the decode tiles 2-4 % faster on
    an H100, outputs identical: benchmarks/README.md)."""
    cols = k0 + tl.arange(0, BK)
    mask = row_ok[:, None] & (cols < n_in)[None, :]
    q = tl.load(q_ptr + rows[:, None] * n_in + cols[None, :], mask=mask, other=0).to(tl.int32)
    gcol = k0 // G + tl.arange(0, BK // G)
    g = rows[:, None] * groups + gcol[None, :]
    gmask = row_ok[:, None] & (gcol < groups)[None, :]
    scale = tl.load(s_ptr + g, mask=gmask, other=0.0)
    zp = tl.load(z_ptr + g, mask=gmask, other=0).to(tl.float32) * mult + 8388608.0  # + 2^23
    high_bits = (255 >> shift) << shift
    w = ((q & high_bits) | 0x4B000000).to(tl.float32, bitcast=True).reshape(BN, BK // G, G)
    return ((w - zp[:, :, None]) * scale[:, :, None]).reshape(BN, BK)


@triton.jit
def _path(v, E, shift_low, mult_low, copy_low):
    """Virtual expert v's expert, code copy, shift, scale multiplier and zero-point row."""
    low = v >= E
    return (
        v % E,
        tl.where(low, copy_low, 0),
        tl.where(low, shift_low, 0),
        tl.where(low, mult_low, 1.0),
        low.to(tl.int64),
    )


@triton.jit
def _block(block_ptr, ids_ptr, E, shift_low, mult_low, copy_low, BM: tl.constexpr,
           BN: tl.constexpr):  # fmt: skip
    """This program's block: its virtual expert v (v >= 2E: none), v's path (`_path`), its
    slots and their (token, slot) pairs, and its output columns."""
    v = tl.load(block_ptr + tl.program_id(0))
    e, copy, shift, mult, path = _path(v, E, shift_low, mult_low, copy_low)
    slots = tl.program_id(0) * BM + tl.arange(0, BM)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    return v, e, copy, shift, mult, path, slots, tl.load(ids_ptr + slots), n


@triton.jit(do_not_specialize=["F"])
def _gate_up(x_ptr, ids_ptr, block_ptr, q_ptr, s_ptr, z_ptr, h_ptr, F, E, V, TOPK,
             shift_low, mult_low, copy_low, q_copy, s_copy, z_path, I: tl.constexpr,
             H: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
             BK: tl.constexpr):  # fmt: skip
    v, e, copy, shift, mult, path, slots, f, n = _block(
        block_ptr, ids_ptr, E, shift_low, mult_low, copy_low, BM, BN
    )
    if v >= V:
        return
    token = f // TOPK
    groups = H // G
    q = q_ptr + copy * q_copy + e * (2 * I * H)
    s = s_ptr + copy * s_copy + e * (2 * I * groups)
    z = z_ptr + path * z_path + e * (2 * I * groups)
    # The tile is computed transposed, the dequantized codes as the product's first operand, so
    # Hopper's warpgroup MMA takes them from registers (rows first, a block of 16 rows compiled
    # to mma.sync): the B=128 recorded step 22.4 -> 21.7 ms on an H100 (benchmarks/README.md).
    acc_gate = tl.zeros((BN, BM), dtype=tl.float32)
    acc_up = tl.zeros((BN, BM), dtype=tl.float32)
    for k0 in range(0, H, BK):
        k = k0 + tl.arange(0, BK)
        xt = tl.load(x_ptr + token[None, :] * H + k[:, None],
                     mask=(f < F)[None, :] & (k < H)[:, None], other=0.0)  # fmt: skip
        w_gate = _dequant(q, s, z, n, k0, H, groups, shift, mult, G, BN, BK, n < I).to(xt.dtype)
        w_up = _dequant(q, s, z, n + I, k0, H, groups, shift, mult, G, BN, BK, n < I).to(xt.dtype)
        acc_gate = tl.dot(w_gate, xt, acc_gate)
        acc_up = tl.dot(w_up, xt, acc_up)
    h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
    tl.store(h_ptr + slots[None, :] * I + n[:, None], h.to(h_ptr.dtype.element_ty),
             mask=(n < I)[:, None])  # fmt: skip


@triton.jit(do_not_specialize=["F"])
def _down(h_ptr, ids_ptr, block_ptr, w_ptr, q_ptr, s_ptr, z_ptr, y_ptr, F, E, V,
          shift_low, mult_low, copy_low, q_copy, s_copy, z_path, I: tl.constexpr,
          H: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
          BK: tl.constexpr):  # fmt: skip
    v, e, copy, shift, mult, path, slots, f, n = _block(
        block_ptr, ids_ptr, E, shift_low, mult_low, copy_low, BM, BN
    )
    if v >= V:
        return
    groups = I // G
    q = q_ptr + copy * q_copy + e * (H * I)
    s = s_ptr + copy * s_copy + e * (H * groups)
    z = z_ptr + path * z_path + e * (H * groups)
    acc = tl.zeros((BN, BM), dtype=tl.float32)  # transposed, as in _gate_up
    for k0 in range(0, I, BK):
        k = k0 + tl.arange(0, BK)
        ht = tl.load(h_ptr + slots[None, :] * I + k[:, None], mask=(k < I)[:, None], other=0.0)
        w = _dequant(q, s, z, n, k0, I, groups, shift, mult, G, BN, BK, n < H)
        acc = tl.dot(w.to(ht.dtype), ht, acc)
    weight = tl.load(w_ptr + f, mask=f < F, other=0.0).to(tl.float32)
    y = acc * weight[None, :]
    tl.store(y_ptr + f[None, :] * H + n[:, None], y.to(y_ptr.dtype.element_ty),
             mask=(f < F)[None, :] & (n < H)[:, None])  # fmt: skip


@triton.jit
def _dequantize(q_ptr, s_ptr, z_ptr, w_ptr, used_ptr, first, E, shift_low, mult_low,
                copy_low, q_copy, s_copy, z_path, OUT: tl.constexpr, IN: tl.constexpr,
                G: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """Program (virtual expert first + i, block of BN output rows): its weights [OUT, IN] in
    the output's dtype at w[i], if any (token, slot) pair uses it (used[v] > 0)."""
    i = tl.program_id(0)
    v = first + i
    if tl.load(used_ptr + v) == 0:
        return
    e, copy, shift, mult, path = _path(v, E, shift_low, mult_low, copy_low)
    groups = IN // G
    q = q_ptr + copy * q_copy + e * (OUT * IN)
    s = s_ptr + copy * s_copy + e * (OUT * groups)
    z = z_ptr + path * z_path + e * (OUT * groups)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    out = w_ptr + i.to(tl.int64) * (OUT * IN)
    for k0 in range(0, IN, BK):
        w = _dequant(q, s, z, rows, k0, IN, groups, shift, mult, G, BN, BK, rows < OUT)
        cols = k0 + tl.arange(0, BK)
        tl.store(out + rows[:, None] * IN + cols[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=(rows < OUT)[:, None] & (cols < IN)[None, :])  # fmt: skip


def dequantize(ex, name: str, used: torch.Tensor, low: tuple, first: int, count: int):
    """[count, out, in] weights of projection `name` of the virtual experts first ..
    first + count in the model's dtype, written for those with used[v] > 0 only (the others
    are left as allocated: never read)."""
    q, s, z = (getattr(ex, f"{name}_{part}") for part in ("q", "scale", "zp"))
    out, inn = q.shape[2], q.shape[3]
    g = ex.bits.group
    w = torch.empty((count, out, inn), dtype=ex.dtype, device=q.device)
    _dequantize[(count, triton.cdiv(out, 64))](
        q, s, z, w, used, first, ex.num_experts, *low, q[0].numel(), s[0].numel(),
        z[0].numel(), OUT=out, IN=inn, G=g, BN=64, BK=max(g, 64),
    )  # fmt: skip
    return w


@triton.jit
def _silu_mul(gu_ptr, h_ptr, I: tl.constexpr, BI: tl.constexpr):  # fmt: skip
    """Row r of h = silu(gate) * up from the fused [rows, 2I] gate/up output, each product
    rounded to h's dtype as PyTorch's `act_fn(gate) * up` rounds it."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BI + tl.arange(0, BI)
    m = cols < I
    gate = tl.load(gu_ptr + r * 2 * I + cols, mask=m, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + r * 2 * I + I + cols, mask=m, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(h_ptr.dtype.element_ty).to(tl.float32)
    tl.store(h_ptr + r * I + cols, (act * up).to(h_ptr.dtype.element_ty), mask=m)


@triton.jit
def _combine(ys_ptr, where_ptr, w_ptr, out_ptr, H: tl.constexpr, TOPK: tl.constexpr,
             BH: tl.constexpr):  # fmt: skip
    """Token t's output: the sum in float32, slot by slot, of its k pairs' outputs (at rows
    where[t * k + j] of ys) times their routing weights, each product rounded to the output's
    dtype first (as the PyTorch epilogue it replaced: `y * weight`, then the sum over slots)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    m = cols < H
    acc = tl.zeros((BH,), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        row = tl.load(where_ptr + t * TOPK + j)
        y = tl.load(ys_ptr + row * H + cols, mask=m, other=0.0).to(tl.float32)
        weight = tl.load(w_ptr + t * TOPK + j).to(tl.float32)
        acc += (y * weight).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=m)


def grouped(ex, hidden, v, weights, topk: int, low: tuple) -> torch.Tensor:
    """The experts' output per token [T, H] through torch's grouped GEMM on dequantized
    weights: pairs sorted by virtual expert, each expert's rows one group. The experts are
    dequantized CHUNK at a time, and those no pair uses not at all: a layer's weights whole
    (1.3 GiB at Qwen1.5-MoE's shape) found no room in the memory a loaded model leaves
    fragmented. The activation is SiLU (CodeExperts.forward's condition for these kernels)."""
    inter = ex.gate_up_proj_q.shape[2] // 2
    used = torch.zeros(2 * ex.num_experts, dtype=torch.int64, device=v.device)
    used.scatter_add_(0, v, torch.ones_like(v))
    order = torch.argsort(v, stable=True)
    x = hidden[order // topk]
    ends = used.cumsum(0)
    bounds = [0, *ends.tolist()]  # pairs before each expert, on the host (one wait)
    mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    ys = torch.empty_like(x)  # each pair's output, in expert order
    for first in range(0, len(used), CHUNK):
        last = min(first + CHUNK, len(used))
        rows = slice(bounds[first], bounds[last])
        if rows.start == rows.stop:
            continue
        offs = (ends[first:last] - rows.start).to(torch.int32)
        w = dequantize(ex, "gate_up_proj", used, low, first, last - first)
        gate_up = mm(x[rows], w.transpose(1, 2), offs=offs)
        h = gate_up.new_empty((len(gate_up), inter))
        _silu_mul[(len(gate_up), triton.cdiv(inter, 1024))](gate_up, h, I=inter, BI=1024)
        w = dequantize(ex, "down_proj", used, low, first, last - first)
        ys[rows] = mm(h, w.transpose(1, 2), offs=offs)
    where = torch.empty_like(order)
    where[order] = torch.arange(len(order), device=order.device)
    tokens, hsize = hidden.shape
    out = torch.empty_like(hidden)
    _combine[(tokens, triton.cdiv(hsize, 1024))](ys, where, weights, out, H=hsize, TOPK=topk,
                                                 BH=1024)  # fmt: skip
    return out


def low_path(ex) -> tuple:
    """The kernels' arguments for the low path of CodeExperts `ex`: (code shift, scale
    multiplier, index of its code copy: 1 where `bits.scheme=base` keeps a second one)."""
    return ex.shift, float(2**ex.shift), int(ex.gate_up_proj_q.shape[0] > 1)


def code_experts(ex, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights):
    """CodeExperts.forward on CUDA (`ex`: the CodeExperts module)."""
    tokens, hsize = hidden.shape
    topk = top_k_index.shape[1]
    v = top_k_index.reshape(-1)
    low = low_path(ex)
    weights = top_k_weights.reshape(-1).contiguous()
    x = hidden.contiguous()
    if v.numel() >= GROUPED_ROWS * ex.num_experts and grouped_gemm_serves(hidden):
        try:
            return grouped(ex, x, v, weights, topk, low)
        except torch.OutOfMemoryError:
            pass  # the tile kernels need no dequantized copy
    y = tiles(ex, x, v, weights, topk, low)
    return y.view(tokens, topk, hsize).sum(1, dtype=torch.float32).to(hidden.dtype)


def tile_shapes(pairs: int, num_experts: int, group: int):
    """(BM, then (BN, BK, stages, warps) of `_gate_up` and of `_down`) for a call of `pairs`
    pairs.
    Small batches: few rows per expert, a short block; large ones: a square tile. A step of a
    few tokens runs few programs, each better with a longer K step (measured on an H200). Where
    an expert's rows fit about one block (a decode step of up to ~16 x E / k tokens) wider
    tiles read its codes in fewer, longer programs, and `_down` keeps them up to two blocks
    (measured on an H100 at 512 and 1,036 pairs, each GEMM alone: benchmarks/README.md, the
    sixth round, with the rows-first tiles; `benchmarks/kernel_speed.py --sweep` runs such a
    sweep). Three stages everywhere: `_gate_up`'s wide tile with four needs 138 KB of shared
    memory, one program a multiprocessor; with three two fit (the ninth round)."""
    bm = 16 if pairs <= 16 * 2 * num_experts else 64
    short = (64, max(group, 128 if pairs <= 16 else 64), STAGES, 4)
    wide = (128, max(group, 128), STAGES, 4) if 16 < pairs and bm == 16 else None
    gate_up = wide if wide and pairs <= 16 * num_experts else short
    return bm, gate_up, wide or short


def launch_tokens(num_experts: int, topk: int, group: int) -> list[int]:
    """Tokens of a `code_experts` call for each kind of launch it makes: the fewest that get
    each distinct `tile_shapes` answer, then the fewest that take the grouped GEMM. Calls of
    these sizes compile every kernel the model's experts launch here."""
    grouped = -(-GROUPED_ROWS * num_experts // topk)
    first = {}
    for tokens in range(1, grouped):
        first.setdefault(tile_shapes(tokens * topk, num_experts, group), tokens)
    return [*first.values(), grouped]


def tiles(ex, x, v, weights, topk: int, low: tuple, shapes=None) -> torch.Tensor:
    """The experts' output per (token, slot) pair [F, H] through the two GEMMs above, which
    dequantize each tile of codes they read; `shapes`: `tile_shapes`' kind of answer, to try
    others (benchmarks/kernel_speed.py --sweep)."""
    hsize, e, f = x.shape[1], ex.num_experts, v.numel()
    gu_q, gu_s, gu_z = ex.gate_up_proj_q, ex.gate_up_proj_scale, ex.gate_up_proj_zp
    dn_q, dn_s, dn_z = ex.down_proj_q, ex.down_proj_scale, ex.down_proj_zp
    inter = gu_q.shape[2] // 2
    g = ex.bits.group
    bm, (gu_n, gu_k, gu_stages, gu_warps), (dn_n, dn_k, dn_stages, dn_warps) = (
        shapes or tile_shapes(f, e, g)
    )
    ids, blocks = aligned(v, 2 * e, bm)
    h = torch.empty((ids.numel(), inter), dtype=x.dtype, device=x.device)
    _gate_up[(blocks.numel(), triton.cdiv(inter, gu_n))](
        x, ids, blocks, gu_q, gu_s, gu_z, h, f, e, 2 * e, topk, *low,
        gu_q[0].numel(), gu_s[0].numel(), gu_z[0].numel(), I=inter, H=hsize, G=g, BM=bm,
        BN=gu_n, BK=gu_k, num_stages=gu_stages, num_warps=gu_warps,
    )  # fmt: skip
    y = torch.empty((f, hsize), dtype=x.dtype, device=x.device)
    _down[(blocks.numel(), triton.cdiv(hsize, dn_n))](
        h, ids, blocks, weights, dn_q, dn_s, dn_z, y, f, e, 2 * e, *low,
        dn_q[0].numel(), dn_s[0].numel(), dn_z[0].numel(), I=inter, H=hsize, G=g, BM=bm,
        BN=dn_n, BK=dn_k, num_stages=dn_stages, num_warps=dn_warps,
    )  # fmt: skip
    return y


def grouped_gemm_serves(hidden: torch.Tensor) -> bool:
    """torch's grouped GEMM takes bf16 on CUDA (and any float on the CPU); a captured step
    keeps the kernels above (no allocation of a layer's weights inside a graph)."""
    if not hidden.is_cuda:
        return True
    return hidden.dtype == torch.bfloat16 and not torch.cuda.is_current_stream_capturing()
