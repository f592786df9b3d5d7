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
from slicemoe.models import EXPERT_BIASES, moe_blocks, router_of
from slicemoe.models.adapter import quantize_model
from slicemoe.run import Loaded, load_key
from slicemoe.simulator import Simulator

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
    "granitemoeshared": (
        "GraniteMoeSharedConfig",
        dict(num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=24),
    ),
    "granitemoehybrid": (
        "GraniteMoeHybridConfig",
        dict(num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=24,
             layer_types=["mamba", "attention", "mamba"], num_hidden_layers=3, mamba_n_heads=4,
             mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=4),
    ),
    "phimoe": ("PhimoeConfig", dict(num_local_experts=8, num_experts_per_tok=2)),
    "qwen3_next": (
        "Qwen3NextConfig",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
             shared_expert_intermediate_size=24, head_dim=8, num_hidden_layers=3,
             layer_types=["linear_attention", "full_attention", "linear_attention"],
             linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
             linear_num_value_heads=4),
    ),
    "jamba": (
        "JambaConfig",
        dict(num_experts=8, num_experts_per_tok=2, num_hidden_layers=4, expert_layer_period=2,
             expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4,
             mamba_dt_rank=4, mamba_expand=2, use_mamba_kernels=False),
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=16, moe_num_shared_experts=1,
             moe_layer_start_index=1, moe_layer_end_index=2, num_hidden_layers=3, head_dim=8),
    ),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", dict(num_experts=8, moe_topk=2, head_dim=8)),
    "cohere2_moe": (
        "Cohere2MoeConfig",
        dict(num_experts=8, num_experts_per_tok=2, expert_selection_fn="sigmoid",
             norm_topk_prob=True, head_dim=8, sliding_window=4,
             layer_types=["sliding_attention", "full_attention"]),
    ),
    "minimax_m2": (
        "MiniMaxM2Config", dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8),
    ),
    "afmoe": (
        "AfmoeConfig",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, num_dense_layers=1,
             num_hidden_layers=3, head_dim=8, num_shared_experts=1, route_scale=2.5,
             sliding_window=4, layer_types=["sliding_attention", "full_attention",
                                            "sliding_attention"]),
    ),
    "lfm2_moe": (
        "Lfm2MoeConfig",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, num_dense_layers=1,
             num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"],
             norm_topk_prob=True, routed_scaling_factor=2.5, use_expert_bias=True),
    ),
    "deepseek_v32": (
        "DeepseekV32Config",
        dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
             n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=8, n_group=4, topk_group=2,
             routed_scaling_factor=2.5, norm_topk_prob=True, num_hidden_layers=3,
             num_key_value_heads=4, mlp_layer_types=["dense", "sparse", "sparse"],
             index_n_heads=2, index_head_dim=8, index_topk=64),
    ),
    "glm4_moe_lite": (
        "Glm4MoeLiteConfig",
        dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
             n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=8, n_group=4, topk_group=2,
             routed_scaling_factor=2.5, norm_topk_prob=True, num_hidden_layers=3,
             num_key_value_heads=4, mlp_layer_types=["dense", "sparse", "sparse"]),
    ),
    "exaone_moe": (
        "ExaoneMoeConfig",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_group=4,
             topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, head_dim=8,
             num_shared_experts=1, sliding_window=4,
             layer_types=["sliding_attention", "full_attention"]),
    ),
    "kimi_linear": (
        "KimiLinearConfig",
        dict(num_experts=8, num_experts_per_token=2, moe_intermediate_size=16,
             num_shared_experts=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=8, num_expert_group=4, topk_group=2,
             routed_scaling_factor=2.5, moe_renormalize=True, num_hidden_layers=3,
             num_key_value_heads=4, mlp_layer_types=["dense", "sparse", "sparse"],
             pad_token_id=0, bos_token_id=1, eos_token_id=2,
             linear_attn_config={"kda_layers": [1, 3], "full_attn_layers": [2],
                                 "head_dim": 8, "num_heads": 4, "short_conv_kernel_size": 4}),
    ),
}  # fmt: skip


def tiny(family: str):
    cls, extra = FAMILIES[family]
    config = getattr(transformers, cls)(**{**COMMON, **extra})
    assert config.hidden_size == 32 and config.vocab_size == 96, "the test config is not small"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    blocks = moe_blocks(model)
    with torch.no_grad():
        for block in blocks:
            # Random routers and nonzero biases (some families initialise them to zero), so that
            # routing depends on the tokens, selection-only biases change which experts win and
            # expert biases change the outputs.
            router = router_of(block)
            tensors = [*router.parameters(), *router.buffers()]
            tensors += [getattr(block, n) for n in ("e_score_correction_bias", "expert_bias")
                        if isinstance(getattr(block, n, None), torch.Tensor)]  # fmt: skip
            tensors += [getattr(block.experts, n) for n in EXPERT_BIASES
                        if hasattr(block.experts, n)]  # fmt: skip
            for t in tensors:
                if t.is_floating_point():
                    t.copy_(0.3 * torch.randn(t.shape))
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
    nll = Simulator(cfg, loaded).loglikelihood(
        range(3), [r[:s] for r, s in zip(rows, split)], [r[s:] for r, s in zip(rows, split)]
    )
    for row, s, got in zip(rows, split, nll):
        with torch.no_grad():
            logits = reference(torch.tensor([row])).logits[0].float()
        logp = torch.log_softmax(logits[:-1], -1)
        want = [-float(logp[i, row[i + 1]]) for i in range(s - 1, len(row) - 1)]
        assert len(got) == len(want)
        assert got == pytest.approx(want, abs=1e-5), family


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_router_logits_computed_alone_are_the_family_s(family):
    """Where `install` finds a router's logits to be F.linear of its weight, it computes them
    alone (no softmax or top-k for the runtime to discard): the very logits of the family's own
    forward, for the hidden states its block hands it."""
    from slicemoe.models import adapter

    model, _ = tiny(family)
    plain = copy.deepcopy(model)  # its routers keep the family's forward
    seen = []
    for block in moe_blocks(plain):
        router_of(block).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain(ids)
    adapter.install(model, SimpleNamespace())
    for block, own, hidden in zip(moe_blocks(model), moe_blocks(plain), seen, strict=True):
        with torch.no_grad():
            got, want = (
                adapter.router_logits(block, hidden)[0],
                adapter.router_logits(own, hidden)[0],
            )
        assert torch.equal(got, want), family
        router = router_of(block)
        if family in ("qwen2_moe", "mixtral", "olmoe"):
            assert router._slicemoe_linear, family


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
        cache=CacheConfig(frac=0.3),
        # With k=2 renormalised weights, tau=0.5 makes exactly the larger one critical.
        policy=PolicyConfig(
            routing="cache_prior", lam=0.1, precision="dbsc", warmup="pcw", tau=0.5
        ),
    )
    quantize_model(model, cfg.bits)
    loaded = Loaded(
        load_key(cfg),
        model,
        SimpleNamespace(pad_token_id=0, decode=str, batch_decode=lambda rows: list(map(str, rows))),
        shape,
        "cpu",
    )
    sim = Simulator(cfg, loaded)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (7, 11)]
    sim.generate_until(range(len(prompts)), prompts, max_new=8)
    rows = sim.groups[0].rows()
    assert np.isfinite(rows).all() and rows[:, COL["tokens"]].sum() == 2 * 7
    assert rows[:, COL["requests_LSB"]].sum() > 0 and rows[:, COL["misses_MSB"]].sum() > 0
    assert 0 < rows[:, COL["highbit_calls"]].sum() < rows[:, COL["expert_calls"]].sum()


def test_a_refused_family_says_why():
    from slicemoe.models import gate_rule

    with pytest.raises(ValueError, match="minimax.*cache of their own"):
        gate_rule(SimpleNamespace(model_type="minimax", num_experts_per_tok=2))
    with pytest.raises(ValueError, match="has no gating rule; supported: qwen2_moe"):
        gate_rule(SimpleNamespace(model_type="switch_transformers", num_experts_per_tok=2))


@pytest.mark.parametrize("family", ["minimax", "llama4_text", "longcat_flash"])
def test_every_refused_family_gives_its_reason_from_config_json_alone(family, tmp_path):
    from slicemoe.models import REFUSED, read_shape

    config = transformers.CONFIG_MAPPING[family]()
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is not supported: " + REFUSED[family][:30]):
        read_shape(str(tmp_path))


def test_a_real_model_validates_from_its_shipped_config_and_asks_for_weights_to_run():
    from slicemoe.run import capacity_bytes, validate
    from slicemoe.validate import ConfigError

    cfg = RunConfig(model=ModelConfig(name="qwen3-30b-a3b", path=None, dtype="bfloat16"))
    validate(cfg, weights=False)
    # 25 % of 48 layers x 128 experts x 3 x 2048 x 768 weights at 8 bits.
    from slicemoe.models import SHIPPED_CONFIGS, read_shape

    shape = read_shape(str(SHIPPED_CONFIGS / "qwen3-30b-a3b"))
    assert capacity_bytes(cfg, shape) == 48 * 128 * 3 * 2048 * 768 // 4
    with pytest.raises(ConfigError, match="model.path is required for model=qwen3-30b-a3b"):
        validate(cfg)
