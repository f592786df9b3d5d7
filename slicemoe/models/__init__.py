"""Hugging Face MoE models: where their MoE blocks are and how each family gates.

transformers 5.x gives every supported family the same seams: a sparse block with `gate` (a
router module whose forward returns `(logits, top-k weights, top-k indices)`) and `experts`
(fused 3-D `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I)). The adapter works on those
seams only, so a family needs nothing here but its gating rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from slicemoe.routing import Gate

TINY_PATH = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny"


def resolve_path(path: str | None) -> str:
    return str(TINY_PATH) if path in (None, "", "tiny") else str(path)


SUPPORTED = (
    "qwen2_moe", "qwen3_moe", "olmoe", "flex_olmo", "mixtral", "granitemoe",
    "deepseek_v2", "deepseek_v3", "glm4_moe", "dots1", "gpt_oss",
)  # fmt: skip
# Checked and refused, with the reason.
REFUSED = {
    "minimax": "its lightning-attention layers keep a cache of their own, which the simulator's "
    "batched prefill/decode (a transformers DynamicCache) cannot drive",
}


def gate_rule(config) -> Gate:
    """The model's own scoring, normalisation and scaling, by family (FACTS.md)."""
    t = config.model_type
    k = config.num_experts_per_tok
    if t == "deepseek_v2":
        grouped = getattr(config, "topk_method", "greedy") == "group_limited_greedy"
        return Gate(
            k,
            "softmax",
            norm_topk=False,
            scale=float(config.routed_scaling_factor),
            n_group=int(config.n_group) if grouped else 1,
            topk_group=int(config.topk_group) if grouped else 1,
        )
    if t in ("deepseek_v3", "glm4_moe", "dots1"):
        # Sigmoid scores; a score-correction bias (per layer, passed with each call) picks the
        # experts and the groups (best two per group summed), the bare scores weight them.
        return Gate(
            k,
            "sigmoid",
            norm_topk=bool(config.norm_topk_prob),
            scale=float(config.routed_scaling_factor),
            n_group=int(config.n_group),
            topk_group=int(config.topk_group),
            group_score="top2",
        )
    if t == "gpt_oss":
        # Top-k of the (biased) router logits, softmax over the chosen k: the same as softmax
        # over all experts renormalised over the chosen ones.
        return Gate(k, "softmax", norm_topk=True)
    if t in REFUSED:
        raise ValueError(f"model type {t!r} is not supported: {REFUSED[t]}")
    if t in ("mixtral", "granitemoe"):
        return Gate(k, "softmax", norm_topk=True)
    if t in ("qwen2_moe", "qwen3_moe", "olmoe", "flex_olmo"):
        return Gate(k, "softmax", norm_topk=bool(getattr(config, "norm_topk_prob", False)))
    raise ValueError(f"model type {t!r} has no gating rule; supported: {', '.join(SUPPORTED)}")


def router_of(block):
    """A sparse block's router: `gate` in most families, `router` in gpt-oss."""
    return block.gate if hasattr(block, "gate") else block.router


def moe_blocks(model) -> list:
    """The sparse MoE blocks in layer order (dense layers, e.g. DeepSeek's first, are skipped)."""
    return [
        m
        for m in model.modules()
        if (hasattr(m, "gate") or hasattr(m, "router"))
        and hasattr(getattr(m, "experts", None), "gate_up_proj")
    ]


# Families whose fused expert tensors are stored (E, in, out) rather than (E, out, in).
IN_OUT_EXPERTS = {"gpt_oss"}


@dataclass(frozen=True)
class Shape:
    """What the cache and the hardware model need to know about a model, from config.json."""

    num_moe_layers: int
    num_experts: int
    top_k: int
    hidden: int
    moe_intermediate: int
    # Per-expert parameters kept at 16 bits next to the quantized weights (gpt-oss's biases).
    expert_bias: int = 0

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.moe_intermediate


def read_shape(path: str | None) -> Shape:
    """Read the model's shape without loading weights (for validation and cache sizing)."""
    cfg_file = Path(resolve_path(path)) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"model.path={path!r} has no config.json; point model.path at a local HF checkpoint"
        )
    c = json.loads(cfg_file.read_text())
    n_layers = c["num_hidden_layers"]
    experts = c.get("num_experts", c.get("num_local_experts", c.get("n_routed_experts")))
    inter = c.get("moe_intermediate_size", c.get("intermediate_size"))
    dense = c.get("first_k_dense_replace", 0)  # DeepSeek, GLM-4.5, dots.llm1: dense first
    step = c.get("decoder_sparse_step", 1) or 1
    sparse = [i for i in range(dense, n_layers) if (i + 1) % step == 0]
    sparse = [i for i in sparse if i not in set(c.get("mlp_only_layers", []))]
    bias = 2 * inter + c["hidden_size"] if c.get("model_type") == "gpt_oss" else 0
    return Shape(len(sparse), experts, c["num_experts_per_tok"], c["hidden_size"], inter, bias)
