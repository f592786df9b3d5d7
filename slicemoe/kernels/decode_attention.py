"""One query token per row against a static KV cache, reading only the slots its mask allows.

The simulator's static KV cache is sized for the batch's longest prompt plus its new tokens, and
rows are left-padded: a short prompt's row holds padding in most of its slots, and early in
decoding every row's later slots are empty. SDPA with an additive mask reads every slot of every
row; this kernel reads each block of slots' mask first (two bytes a slot) and skips the keys and
values (a kilobyte a slot and head at Qwen1.5-MoE's shape) of a block the mask blocks entirely,
whose softmax weights are exactly zero. A block that is partly allowed adds the mask as SDPA
does. Long rows are split over several programs whose partial softmaxes are merged after
(flash-decoding, merged by a second kernel), so a small batch still keeps every SM busy.

Registered with transformers as the attention implementation "slicemoe" (`attend`): a decode
step on CUDA takes this kernel, anything else (prefill, the CPU) transformers' SDPA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 64  # slots a program reads at a time: the unit of skipping
SPLIT_MIN = 256  # slots a program takes at least
WAVES = 4  # programs per SM that keep its memory requests in flight


@triton.jit
def _partial(q_ptr, k_ptr, v_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr, scale, blocked, S, H, GROUP,
             SPLIT_LEN, SPLITS, sqb, sqh, skb, skh, sks, svb, svh, svs, smb, sms,
             D: tl.constexpr, BN: tl.constexpr, BLOCKS: tl.constexpr):  # fmt: skip
    """Program (row x head, split): the running max, the sum of exponentials and the weighted
    sum of values over the split's allowed slots. BLOCKS (a power of two, so few variants
    compile) covers the split; blocks past its end are masked, so skipped."""
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // GROUP
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sqb + h * sqh + d).to(tl.float32) * scale
    m = tl.full((), float("-inf"), tl.float32)
    total = tl.zeros((), tl.float32)
    acc = tl.zeros((D,), tl.float32)
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, S)
    for i in range(BLOCKS):
        slots = start + i * BN + tl.arange(0, BN)
        inside = slots < end
        add = tl.load(mask_ptr + b * smb + slots * sms, mask=inside, other=blocked)
        add = add.to(tl.float32)
        if tl.max(add, 0) > blocked:
            k = tl.load(k_ptr + b * skb + hk * skh + slots[:, None] * sks + d[None, :],
                        mask=inside[:, None], other=0.0)  # fmt: skip
            s = tl.sum(k.to(tl.float32) * q[None, :], 1) + add
            s = tl.where(inside, s, float("-inf"))
            new = tl.maximum(m, tl.max(s, 0))
            alpha = tl.exp(m - new)
            p = tl.exp(s - new)
            v = tl.load(v_ptr + b * svb + hk * svh + slots[:, None] * svs + d[None, :],
                        mask=inside[:, None], other=0.0)  # fmt: skip
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
            total = total * alpha + tl.sum(p, 0)
            m = new
    out = bh * SPLITS + split
    tl.store(m_ptr + out, m)
    tl.store(l_ptr + out, total)
    tl.store(acc_ptr + out * D + d, acc)


@triton.jit
def _merge(m_ptr, l_ptr, acc_ptr, o_ptr, SPLITS, D: tl.constexpr, SP: tl.constexpr):
    """Program (row x head): its splits' partial softmaxes merged, each rescaled to their
    largest maximum (a split with no allowed slot has m = -inf and weighs nothing), written in
    the output's dtype; SP, a power of two, covers the splits."""
    bh = tl.program_id(0)
    j = tl.arange(0, SP)
    d = tl.arange(0, D)
    ok = j < SPLITS
    m = tl.load(m_ptr + bh * SPLITS + j, mask=ok, other=float("-inf"))
    total = tl.load(l_ptr + bh * SPLITS + j, mask=ok, other=0.0)
    acc = tl.load(acc_ptr + (bh * SPLITS + j)[:, None] * D + d[None, :], mask=ok[:, None],
                  other=0.0)  # fmt: skip
    w = tl.exp(m - tl.max(m, 0))
    out = tl.sum(acc * w[:, None], 0) / tl.sum(total * w, 0)
    tl.store(o_ptr + bh * D + d, out.to(o_ptr.dtype.element_ty))


def splits_for(rows: int, heads: int, slots: int, sms: int) -> int:
    """Programs per (row, head): enough for WAVES programs on every SM, none with fewer than
    SPLIT_MIN slots."""
    want = -(-WAVES * sms // (rows * heads))
    return max(1, min(want, -(-slots // SPLIT_MIN)))


def decode_attention(query, key, value, mask, scale: float, splits: int | None = None):
    """softmax(q k^T x scale + mask) v for one query per row: query [B, H, 1, D], key and value
    [B, Hkv, S, D], mask [B, 1, 1, S] additive (its dtype's minimum blocks a slot); returns
    [B, 1, H, D] in the query's dtype. `splits`: programs per (row, head) (None: `splits_for`
    the device)."""
    b, h, _, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    if splits is None:
        cuda = query.is_cuda  # elsewhere Triton's interpreter runs it: one "SM"
        sms = torch.cuda.get_device_properties(query.device).multi_processor_count if cuda else 1
        splits = splits_for(b, h, s, sms)
    split_len = triton.cdiv(triton.cdiv(s, splits), BLOCK) * BLOCK
    f32 = dict(dtype=torch.float32, device=query.device)
    m = torch.empty((b, h, splits), **f32)
    total = torch.empty((b, h, splits), **f32)
    acc = torch.empty((b, h, splits, d), **f32)
    mask = mask.expand(b, 1, 1, s)
    _partial[(b * h, splits)](
        query, key, value, mask, m, total, acc, scale, torch.finfo(mask.dtype).min, s, h,
        h // hkv, split_len, splits, query.stride(0), query.stride(1), key.stride(0),
        key.stride(1), key.stride(2), value.stride(0), value.stride(1), value.stride(2),
        mask.stride(0), mask.stride(3), D=d, BN=BLOCK,
        BLOCKS=triton.next_power_of_2(split_len // BLOCK),
    )  # fmt: skip
    out = torch.empty((b, 1, h, d), dtype=query.dtype, device=query.device)
    sp = max(2, triton.next_power_of_2(splits))
    _merge[(b * h,)](m, total, acc, out, splits, D=d, SP=sp)
    return out


def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: a decode step on CUDA with an additive 4D mask (the
    simulator's) through the kernel, anything else (transformers' own boolean masks too)
    through SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    one = query.shape[2] == 1 and query.is_cuda and not module.training
    additive = attention_mask is not None and attention_mask.is_floating_point()
    if not (one and additive and attention_mask.dim() == 4):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return decode_attention(query, key, value, attention_mask, scale), None


def register() -> str:
    """Make "slicemoe" an attention implementation transformers knows (masks as SDPA's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("slicemoe", attend)
    AttentionMaskInterface.register("slicemoe", sdpa_mask)
    return "slicemoe"
