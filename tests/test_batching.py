"""batch_size=auto's rule (slicemoe.batching), on made-up numbers and the shipped configs."""

import numpy as np
import pytest
from transformers import AutoConfig

from slicemoe.batching import (
    MARGIN,
    PREFILL_TOKENS,
    Sizes,
    auto_batches,
    batch_sizes,
    row_bytes,
    sizes,
)
from slicemoe.models import config_dir, read_shape

# A model whose rows are all KV cache: 1 KiB a token, nothing else.
KV_ONLY = Sizes(
    layers=1, kv_per_token=512, dtype_bytes=2, hidden=0, vocab=0, moe_layers=0, experts=0,
    top_k=0, expert_width=0, shared_width=0, ranking_depth=0,
)  # fmt: skip


def test_the_batch_is_the_free_memory_over_a_row_less_the_prefill_workspace():
    tokens = 1000 + 24
    mask = tokens * 3  # the additive bf16 mask and its bool
    row = 1024 * tokens + mask
    assert row_bytes(KV_ONLY, tokens, 24) == row
    free = int((100 * row + PREFILL_TOKENS * tokens * 3) / MARGIN) + 1
    assert (auto_batches(free, KV_ONLY, [1000] * 1000, 24) == 100).all()  # 10 batches of 100
    # 99 fit: 11 batches, evened out to 91 (10 x 91 + 90)
    assert (auto_batches(free - 1000, KV_ONLY, [1000] * 1000, 24) == 91).all()
    # Two configs packed: a sequence is two rows.
    assert (auto_batches(free, KV_ONLY, [1000] * 1000, 24, groups=2) == 50).all()


def test_longer_sequences_and_less_memory_give_smaller_batches_never_below_one():
    b = {n: auto_batches(2**30, KV_ONLY, [n] * 10_000, 256)[0] for n in (100, 1000, 10_000)}
    assert b[100] > b[1000] > b[10_000] >= 1
    assert auto_batches(0, KV_ONLY, [100] * 10, 256).tolist() == [1] * 10


def test_batches_of_shorter_prompts_take_more_sequences_and_come_out_even():
    """Prompts longest first: a batch's KV cache is as long as its first prompt, so later
    batches take more; as many batches as filling each to the budget needs, but even, where
    filling would leave a short last batch."""
    lens = np.repeat([3000, 2000, 1000], 100)
    tokens = lens + 24
    budget = 0.85 * 2**29  # filled, the last batch comes out short
    free = budget / MARGIN

    rows = np.array([row_bytes(KV_ONLY, int(t), 24) for t in tokens])
    filled = batch_sizes((budget - PREFILL_TOKENS * tokens * 3) // rows)
    assert filled == [51, 51, 123, 75]
    taken = batch_sizes(auto_batches(free, KV_ONLY, lens, 24))
    assert len(taken) == len(filled) and taken[0] < filled[0] and taken[-1] > filled[-1]
    assert taken[:-1] == sorted(taken[:-1]) and sum(taken) == len(lens)
    first = np.cumsum([0] + taken[:-1])  # each batch's longest prompt is its first
    assert all(t * rows[i] + PREFILL_TOKENS * tokens[i] * 3 <= budget for t, i in zip(taken, first))


def test_the_qwen_shape_on_an_80_gb_gpu_stays_under_what_ran_out_of_memory():
    """Qwen1.5-MoE-A2.7B in bf16, GSM8K's ~1,000-token 5-shot prompts and 256 new tokens: its
    KV cache is 192 KiB a token (24 layers x 2 x 16 heads x 128), 63 GB at batch 256; 49 GB
    free after loading (measured: batch 128 peaked at 57 GiB, 256 ran out of memory)."""
    name = "qwen1.5-moe-a2.7b"
    s = sizes(
        AutoConfig.from_pretrained(config_dir(name, None)), read_shape(config_dir(name, None)), 2
    )
    assert s.layers * s.kv_per_token * s.dtype_bytes == 24 * 2 * 16 * 128 * 2
    batch = auto_batches(49 * 2**30, s, [1000] * 1319, 256)[0]
    row = row_bytes(s, 1256, 256)
    assert 100 < batch < 200
    assert row == pytest.approx(24 * 2 * 16 * 128 * 2 * 1256, rel=0.05)


def test_multi_head_latent_attention_counts_the_decompressed_keys_and_values():
    name = "deepseek-v2-lite"
    c = AutoConfig.from_pretrained(config_dir(name, None))
    s = sizes(c, read_shape(config_dir(name, None)), 2)
    heads = c.num_attention_heads
    assert s.kv_per_token == heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
