"""Every supported MoE family, at full precision with top-k routing and room for every expert,
scores tokens exactly as plain transformers does (prefill and teacher-forced decode, batch > 1
with left padding): the adapter's gate rule reproduces the family's own selection and weights."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import transformers

from slicemoe.config import BitsConfig, CacheConfig, ModelConfig, PolicyConfig, RunConfig
from slicemoe.models import moe_blocks, router_of
from slicemoe.models.adapter import quantize_model
from slicemoe.run import Loaded, _Simulator, load_key

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
FAMILIES = {
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
             shared_expert_intermediate_size=24, norm_topk_prob=False),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
             head_dim=8),
    ),
    "olmoe": ("OlmoeConfig", dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2)),
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
             n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, topk_method="group_limited_greedy",
             n_group=4, topk_group=2, routed_scaling_factor=2.5, num_hidden_layers=3,
             num_key_value_heads=4),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
             n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=4, topk_group=2,
             routed_scaling_factor=2.5, norm_topk_prob=True, num_hidden_layers=3,
             num_key_value_heads=4),
    ),
    "gpt_oss": (
        "GptOssConfig",
        dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, head_dim=8,
             sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
             n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
             routed_scaling_factor=2.5, norm_topk_prob=True, num_hidden_layers=3, head_dim=8),
    ),
    "dots1": (
        "Dots1Config",
        dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
             n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
             routed_scaling_factor=2.5, norm_topk_prob=True, num_hidden_layers=3, head_dim=8),
    ),
    "flex_olmo": (
        "FlexOlmoConfig",
        dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, pad_token_id=0),
    ),
    "granitemoe": ("GraniteMoeConfig", dict(num_local_experts=8, num_experts_per_tok=2)),
}  # fmt: skip


def tiny(family: str):
    cls, extra = FAMILIES[family]
    config = getattr(transformers, cls)(**{**COMMON, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    blocks = moe_blocks(model)
    with torch.no_grad():
        for block in blocks:
            # Nonzero biases, so that selection-only biases change which experts win and expert
            # biases change the outputs (some families initialise them to zero).
            for module, name in ((router_of(block), "e_score_correction_bias"),
                                 (router_of(block), "bias"), (block.experts, "gate_up_proj_bias"),
                                 (block.experts, "down_proj_bias")):  # fmt: skip
                bias = getattr(module, name, None)
                if isinstance(bias, torch.Tensor):
                    bias.copy_(0.3 * torch.randn(bias.shape))
    return model, read_shape_of(config)


def read_shape_of(config):
    """The shape as `read_shape` gives it from the model's config.json."""
    import tempfile

    from slicemoe.models import read_shape

    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        return read_shape(tmp)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_precision_scores_equal_plain_transformers(family):
    model, shape = tiny(family)
    reference = copy.deepcopy(model)
    cfg = RunConfig(
        model=ModelConfig(name=family, path="random"),
        bits=BitsConfig(name="fp16", high=None, low=None, nonexpert_bits=None),
        cache=CacheConfig(frac=2.0),
        policy=PolicyConfig(precision="high"),
    )
    quantize_model(model, cfg.bits)
    loaded = Loaded(load_key(cfg), model, SimpleNamespace(pad_token_id=0), shape, "cpu")
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (9, 14, 6)]
    split = [4, 9, 2]  # prompt tokens per row; the rest is teacher-forced
    nll = _Simulator(cfg, loaded).batch(
        0, [r[:s] for r, s in zip(rows, split)], forced=[r[s:] for r, s in zip(rows, split)]
    )
    for row, s, got in zip(rows, split, nll):
        with torch.no_grad():
            logits = reference(torch.tensor([row])).logits[0].float()
        logp = torch.log_softmax(logits[:-1], -1)
        want = [-float(logp[i, row[i + 1]]) for i in range(s - 1, len(row) - 1)]
        assert len(got) == len(want)
        assert got == pytest.approx(want, abs=1e-5), family


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shape_from_config_json_alone_matches_the_model(family):
    model, shape = tiny(family)
    blocks = moe_blocks(model)
    ex = blocks[0].experts
    assert shape.num_moe_layers == len(blocks)
    assert shape.num_experts == ex.gate_up_proj.shape[0]
    assert shape.expert_params == ex.gate_up_proj[0].numel() + ex.down_proj[0].numel()
    biases = [getattr(ex, n)[0].numel() for n in ("gate_up_proj_bias", "down_proj_bias")
              if hasattr(ex, n)]  # fmt: skip
    assert shape.expert_bias == sum(biases)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sliced_dbsc_cache_prior_pcw_runs_with_finite_metrics(family):
    import numpy as np

    from slicemoe.metrics import COL

    model, shape = tiny(family)
    cfg = RunConfig(
        model=ModelConfig(name=family, path="random"),
        bits=BitsConfig(group=8),
        cache=CacheConfig(frac=0.15),
        policy=PolicyConfig(routing="cache_prior", lam=0.1, precision="dbsc", warmup="pcw"),
    )
    quantize_model(model, cfg.bits)
    loaded = Loaded(load_key(cfg), model, SimpleNamespace(pad_token_id=0), shape, "cpu")
    sim = _Simulator(cfg, loaded)
    g = torch.Generator().manual_seed(2)
    sim.batch(0, [torch.randint(1, 96, (n,), generator=g).tolist() for n in (7, 11)], max_new=8)
    rows = sim.rows()
    assert np.isfinite(rows).all() and rows[:, COL["tokens"]].sum() == 2 * 7
    assert rows[:, COL["requests_LSB"]].sum() > 0 and rows[:, COL["misses_MSB"]].sum() > 0
    assert 0 < rows[:, COL["highbit_calls"]].sum() < rows[:, COL["expert_calls"]].sum()


def test_a_refused_family_says_why():
    from slicemoe.models import gate_rule

    with pytest.raises(ValueError, match="minimax.*cache of their own"):
        gate_rule(SimpleNamespace(model_type="minimax", num_experts_per_tok=2))
    with pytest.raises(ValueError, match="has no gating rule; supported: qwen2_moe"):
        gate_rule(SimpleNamespace(model_type="phimoe", num_experts_per_tok=2))
