"""What the hardware model charges per layer, from a model's config: KV bytes and op costs."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV2Config

from slicemoe.config import BitsConfig, HardwareConfig
from slicemoe.device import footprint
from slicemoe.models import Shape, model_dims


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


@pytest.mark.parametrize(
    "modules, absent",
    [
        # The replay runs without a model (where transformers may be missing or slow to import).
        ("slicemoe.device, slicemoe.replay", "transformers"),
        # A sweep's driver checks its own settings without torch (importing its entry point took
        # 2.8 s of CPU with it, 0.5 s without); only a runner that needs the model imports it.
        ("sweep.__main__", "torch"),
    ],
)
def test_these_modules_import_without_that_package(modules, absent):
    code = f"import sys, {modules}; print({absent!r} in sys.modules)"
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_mla_caches_the_compressed_latent_not_full_keys_and_values():
    model = deepseek_v2_tiny()
    shape = Shape(1, 8, 2, 32, 16)
    fp = footprint(model_dims(model), shape, BitsConfig(), HardwareConfig(kv_bits=8))
    # One latent of kv_lora_rank plus the shared rope key, at 8 bits: 24 + 8 bytes per layer
    # (full keys and values would be 2 x 4 heads x (16 + 8) = 192). Both layers attend, the
    # first being dense, so the one MoE layer's bill carries two layers' KV and attention.
    assert fp.kv_bytes_per_token == 2 * (24 + 8)
    assert fp.attn_dim == 2 * 4 * (16 + 8)


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


# --- the shipped configs of real models, against hand computations ------------------------------


def shipped(name):
    from slicemoe.models import SHIPPED_CONFIGS, read_shape, skeleton

    path = str(SHIPPED_CONFIGS / name)
    return read_shape(path), model_dims(skeleton(path))


def test_gpt_oss_20b_slices_count_the_expert_biases_and_its_windows_stop_the_kv():
    from slicemoe.device import decode_bill
    from slicemoe.quant import slice_bytes

    shape, dims = shipped("gpt-oss-20b")
    # 24 MoE layers of 32 experts, top-4; experts 2880 wide; biases 2 x 2880 (gate_up) + 2880.
    assert shape == Shape(24, 32, 4, 2880, 2880, 8640)
    # mat84, group 32, asymmetric: 3 x 2880 x 2880 = 24,883,200 weights in 777,600 groups.
    #   FULL = (24,883,200 x 8 + 777,600 x (16 + 8)) / 8 + 2 x 8,640 = 27,233,280
    #   MSB  = (24,883,200 x 4 + 777,600 x (16 + 4)) / 8 + 2 x 8,640 = 14,402,880
    #   LSB  = (24,883,200 x 4 + 777,600 x 4) / 8                     = 12,830,400
    b = BitsConfig()
    sizes = slice_bytes(shape.expert_params, b.high, b.low, b.group, b.symmetric, shape.expert_bias)
    assert sizes == {"FULL": 27_233_280, "MSB": 14_402_880, "LSB": 12_830_400}
    # Attention per layer: q 2880x4096+4096, k and v 2880x512+512 each, o 4096x2880+2880, 64
    # sinks; router 2880x32+32; two norms 2x2880. 26,648,096 per layer, x 24 + the final norm
    # 2880 = 639,557,184 dense params, spread over the 24 MoE layers.
    assert dims.dense_params * 24 == 639_557_184
    # K and V of 8 heads x 64 = 1,024 values per token and layer; 12 full layers and 12 layers
    # with a 128-token window, spread over 24 MoE layers.
    fp = footprint(dims, shape, b, HardwareConfig(kv_bits=8))
    assert (fp.kv_bytes_per_token, fp.window_kv_bytes_per_token, fp.window) == (512, 512, 128)
    assert (fp.attn_dim, fp.window_attn_dim) == (2048, 2048)
    # Decoding token 1,001 reads the full layers' 1,001 tokens and the windowed layers' 128.
    _, dram, _, _ = decode_bill(fp, 0, 1000, 0, 0)
    assert dram - fp.dense_bytes == 512 * 1001 + 512 * 128


def test_mla_model_caches_its_latent_in_every_layer_dense_ones_included():
    from slicemoe.quant import slice_bytes

    shape, dims = shipped("deepseek-v2-lite")
    # 27 layers, the first dense: 26 MoE layers of 64 experts (top-6), 2048 -> 1408 -> 2048.
    assert shape == Shape(26, 64, 6, 2048, 1408, 0)
    # 3 x 2048 x 1408 = 8,650,752 weights, 270,336 groups of 32:
    #   FULL = (8,650,752 x 8 + 270,336 x 24) / 8 = 9,461,760
    #   MSB  = (8,650,752 x 4 + 270,336 x 20) / 8 = 5,001,216
    #   LSB  = (8,650,752 x 4 + 270,336 x 4) / 8  = 4,460,544
    sizes = slice_bytes(shape.expert_params, 8, 4, 32, False)
    assert sizes == {"FULL": 9_461_760, "MSB": 5_001_216, "LSB": 4_460_544}
    # Per token, each of the 27 layers caches the 512-value latent + the 64-value rope key (at
    # 8 bits: 576 B), not 2 x 16 heads x 128 values: 27 x 576 = 15,552 B for the model.
    fp = footprint(dims, shape, BitsConfig(), HardwareConfig(kv_bits=8))
    assert fp.kv_bytes_per_token * 26 == pytest.approx(27 * 576)
    # Queries and keys of 16 heads x (128 + 64) dims score each cached token, in 27 layers.
    assert fp.attn_dim * 26 == pytest.approx(27 * 16 * 192)
