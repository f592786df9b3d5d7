"""What the hardware model charges per layer, from a model's config: KV bytes and op costs."""

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV2Config

from slicemoe.config import BitsConfig, HardwareConfig
from slicemoe.models import Shape
from slicemoe.models.adapter import footprint, model_dims


def deepseek_v2_tiny():
    cfg = DeepseekV2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        kv_lora_rank=24,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def test_mla_caches_the_compressed_latent_not_full_keys_and_values():
    model = deepseek_v2_tiny()
    shape = Shape(1, 8, 2, 32, 16)
    fp = footprint(model_dims(model), shape, BitsConfig(), HardwareConfig(kv_bits=8))
    # One latent of kv_lora_rank plus the shared rope key, at 8 bits: 24 + 8 bytes. Full keys
    # and values would be 2 x 4 heads x (16 + 8) = 192.
    assert fp.kv_bytes_per_token == 24 + 8
    assert fp.attn_dim == 4 * (16 + 8)


@pytest.mark.parametrize(
    "bits, expert_cost, dense_cost",
    [
        (BitsConfig(), 1.0, 1.0),
        (BitsConfig(high=None, low=None), 2.0, 1.0),
        (BitsConfig(high=None, low=None, nonexpert_bits=None), 2.0, 2.0),
    ],
)
def test_fp16_weights_cost_more_ops_than_int8(bits, expert_cost, dense_cost):
    model = deepseek_v2_tiny()
    hw = replace(HardwareConfig(), fp16_op_cost=2.0)
    fp = footprint(model_dims(model), Shape(1, 8, 2, 32, 16), bits, hw)
    assert (fp.expert_op_cost, fp.dense_op_cost) == (expert_cost, dense_cost)
