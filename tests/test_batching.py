"""batch_size=auto's rule (slicemoe.batching), on made-up numbers and the shipped configs."""

import pytest
from transformers import AutoConfig

from slicemoe.batching import MARGIN, PREFILL_TOKENS, Sizes, auto_batch, row_bytes, sizes
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
    assert auto_batch(free, KV_ONLY, 1000, 24) == (100, row)
    assert auto_batch(free - 1000, KV_ONLY, 1000, 24) == (99, row)


def test_longer_sequences_and_less_memory_give_smaller_batches_never_below_one():
    b = {n: auto_batch(2**30, KV_ONLY, n, 256)[0] for n in (100, 1000, 10_000)}
    assert b[100] > b[1000] > b[10_000] >= 1
    assert auto_batch(0, KV_ONLY, 100, 256)[0] == 1


def test_the_qwen_shape_on_an_80_gb_gpu_stays_under_what_ran_out_of_memory():
    """Qwen1.5-MoE-A2.7B in bf16, GSM8K's ~1,000-token 5-shot prompts and 256 new tokens: its
    KV cache is 192 KiB a token (24 layers x 2 x 16 heads x 128), 63 GB at batch 256; 49 GB
    free after loading (measured: batch 128 peaked at 57 GiB, 256 ran out of memory)."""
    name = "qwen1.5-moe-a2.7b"
    s = sizes(
        AutoConfig.from_pretrained(config_dir(name, None)), read_shape(config_dir(name, None)), 2
    )
    assert s.layers * s.kv_per_token * s.dtype_bytes == 24 * 2 * 16 * 128 * 2
    batch, row = auto_batch(49 * 2**30, s, 1000, 256)
    assert 100 < batch < 200
    assert row == pytest.approx(24 * 2 * 16 * 128 * 2 * 1256, rel=0.05)


def test_multi_head_latent_attention_counts_the_decompressed_keys_and_values():
    name = "deepseek-v2-lite"
    c = AutoConfig.from_pretrained(config_dir(name, None))
    s = sizes(c, read_shape(config_dir(name, None)), 2)
    heads = c.num_attention_heads
    assert s.kv_per_token == heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
