"""Hugging Face MoE models: where their MoE blocks are, how each family gates, and the shape
the cache and the hardware model need, read from config.json alone.

transformers 5.x gives the supported families the same seams: a sparse block with a router
(`gate`, or `router`) whose forward returns `(logits, top-k weights, top-k indices)` and
`experts` (fused 3-D `gate_up_proj` and `down_proj`). The adapter works on those seams only,
so a family needs nothing here but its gating rule.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slicemoe.routing import Gate

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
TINY_PATH = CHECKPOINTS / "tiny"
# The published config.json of real models (no weights), by conf/model name: their shapes,
# cache sizes and validation work before model.path points at the weights.
SHIPPED_CONFIGS = CHECKPOINTS / "configs"


def resolve_path(path: str | None) -> str:
    return str(TINY_PATH) if path in (None, "", "tiny") else str(path)


def checkpoint_dir(name: str, path: str | None) -> str:
    """The directory weights are loaded from: model.path, or the shipped tiny checkpoint."""
    if path or name == "tiny":
        return resolve_path(path)
    raise ValueError(
        f"model.path is required for model={name}: set model.path=/dir/of/the/checkpoint "
        "(its shipped config.json gives shapes and cache sizes only, no weights)"
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_checkpoint(path: str) -> None:
    """Refuse, in one line, a checkpoint directory that loading would fail on or that would
    run code: no or malformed config.json, code that needs trust_remote_code, pickle (.bin)
    weights, truncated safetensors files, no tokenizer. Only headers are read."""
    root = Path(path)
    try:
        config = json.loads((root / "config.json").read_text())
    except FileNotFoundError:
        raise ValueError(
            f"{root} has no config.json; point model.path at a HF checkpoint"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{root / 'config.json'} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{root / 'config.json'} names no model_type")
    from transformers import CONFIG_MAPPING

    if config["model_type"] not in CONFIG_MAPPING:
        remote = (
            " and needs trust_remote_code, which is never enabled" if "auto_map" in config else ""
        )
        raise ValueError(
            f"{root / 'config.json'}: model_type {config['model_type']!r} is not in the installed "
            f"transformers{remote}"
        )
    weights = sorted(root.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in root.glob("*.bin"))
        what = (
            f"only pickle weights ({', '.join(pickles)}), which are never loaded"
            if pickles
            else "no weights"
        )
        raise ValueError(f"{root} has {what}: it needs *.safetensors files")
    for f in weights:
        _check_safetensors(f)
    if not any((root / t).is_file() for t in TOKENIZER_FILES):
        raise ValueError(f"{root} has no tokenizer (one of {', '.join(TOKENIZER_FILES)})")


def _check_safetensors(f: Path) -> None:
    """The file holds what its header says: 8 bytes of header length, the JSON header, and
    the tensors up to the largest end offset."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"{f} is truncated or not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{f} has a malformed safetensors header") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size < 8 + n + end:
        raise ValueError(f"{f} is truncated: {size:,} bytes, its header needs {8 + n + end:,}")


def config_dir(name: str, path: str | None) -> str:
    """The directory whose config.json describes the model: the checkpoint's, or the one
    shipped for `name` while model.path is unset."""
    if not path and (SHIPPED_CONFIGS / name).is_dir():
        return str(SHIPPED_CONFIGS / name)
    return checkpoint_dir(name, path)


# --- gating rules, by family -------------------------------------------------------------------


def _k(c) -> int:
    k = getattr(c, "num_experts_per_tok", None) or getattr(c, "moe_topk", None)  # HunYuan
    if not isinstance(k, int):
        raise ValueError(f"{c.model_type}: a top-k per layer ({k!r}) is not supported")
    return k


def _softmax_topk(norm: Callable) -> Callable:
    return lambda c: Gate(_k(c), "softmax", norm_topk=norm(c))


def _norm_flag(c) -> bool:
    return bool(getattr(c, "norm_topk_prob", False))


def _deepseek_v2(c) -> Gate:
    grouped = getattr(c, "topk_method", "greedy") == "group_limited_greedy"
    return Gate(
        _k(c),
        "softmax",
        scale=float(c.routed_scaling_factor),
        n_group=int(c.n_group) if grouped else 1,
        topk_group=int(c.topk_group) if grouped else 1,
    )


def _grouped_top2(scoring: str) -> Callable:
    # DeepSeek-V3 style: groups ranked by the sum of their best two choice scores (with the
    # selection-only bias where the router has one), the chosen experts weighed by bare scores.
    return lambda c: Gate(
        _k(c),
        scoring,
        norm_topk=bool(c.norm_topk_prob),
        scale=float(c.routed_scaling_factor),
        n_group=int(c.n_group),
        topk_group=int(c.topk_group),
        group_score="top2",
    )


def _sigmoid_biased(scale_field: str | None, norm: Callable, norm_eps: float = 0.0) -> Callable:
    return lambda c: Gate(
        _k(c),
        "sigmoid",
        norm_topk=norm(c),
        norm_eps=norm_eps,
        scale=float(getattr(c, scale_field)) if scale_field else 1.0,
    )


def _cohere2(c) -> Gate:
    # Top-k of the logits, then softmax over the k (= renormalised softmax) or sigmoid.
    if c.expert_selection_fn == "softmax":
        return Gate(_k(c), "softmax", norm_topk=True)
    return Gate(_k(c), "sigmoid", norm_topk=_norm_flag(c))


def _phimoe(c) -> Gate:
    if _k(c) != 2:
        raise ValueError(f"phimoe: sparsemixer routes exactly 2 experts, not {_k(c)}")
    return Gate(2, "sparsemixer", jitter_eps=float(c.router_jitter_noise))


_ALWAYS = lambda c: True  # noqa: E731
_NEVER = lambda c: False  # noqa: E731

# model_type -> the family's own selection and weighting, checked against its router's source
# and tested exact against transformers (tests/test_families.py).
RULES: dict[str, Callable[..., Gate]] = {
    # softmax over all experts, top-k, renormalised where norm_topk_prob says so
    **dict.fromkeys(("qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "flex_olmo"),
                    _softmax_topk(_norm_flag)),
    # always renormalised (or, the same thing, softmax over the top-k logits); gpt-oss's
    # router bias is part of its logits
    **dict.fromkeys(("mixtral", "granitemoe", "granitemoeshared", "granitemoehybrid",
                     "hunyuan_v1_moe", "gpt_oss"), _softmax_topk(_ALWAYS)),
    "jamba": _softmax_topk(_NEVER),
    "cohere2_moe": _cohere2,
    "deepseek_v2": _deepseek_v2,
    **dict.fromkeys(("deepseek_v3", "deepseek_v32", "glm4_moe", "glm4_moe_lite", "dots1",
                     "exaone_moe", "kimi_linear"), _grouped_top2("sigmoid")),
    # softmax with a selection-only bias, renormalised with a floor
    "ernie4_5_moe": lambda c: Gate(_k(c), "softmax", norm_topk=True,
                                   norm_min=float(c.moe_norm_min)),
    # sigmoid with a selection-only bias that the block passes to its router
    "minimax_m2": _sigmoid_biased(None, _ALWAYS),
    "afmoe": _sigmoid_biased("route_scale", _ALWAYS, norm_eps=1e-20),
    "lfm2_moe": _sigmoid_biased("routed_scaling_factor", _norm_flag, norm_eps=1e-6),
    "phimoe": _phimoe,
}  # fmt: skip
SUPPORTED = tuple(RULES)

# Checked and refused, with the reason.
REFUSED = {
    "minimax": "its lightning-attention layers keep a cache of their own, which the simulator's "
    "batched prefill/decode (a transformers DynamicCache) cannot drive",
    "llama4_text": "its router's weights scale each expert's input, not its output, and its "
    "block runs every expert on every token, so no top-k seam exists to route through",
    "longcat_flash": "some of its routed experts are zero-computation (identity) experts with "
    "no weights, which a weight cache has nothing to hold for",
}


def gate_rule(config) -> Gate:
    """The model's own scoring, normalisation and scaling, by family."""
    t = config.model_type
    if t in REFUSED:
        raise ValueError(f"model type {t!r} is not supported: {REFUSED[t]}")
    if t not in RULES:
        raise ValueError(f"model type {t!r} has no gating rule; supported: {', '.join(SUPPORTED)}")
    return RULES[t](config)


def router_of(block):
    """A sparse block's router: `gate` in most families, `router` in others."""
    return block.gate if hasattr(block, "gate") else block.router


def selection_bias(router, args: tuple):
    """A router's selection-only score correction, or None: passed in by the block (MiniMax-M2,
    AFMoE, LFM2-MoE), held by the router (DeepSeek-V3 style) or by its statistics (ERNIE)."""
    if args:
        return args[0]
    if hasattr(router, "moe_statics"):
        return router.moe_statics.e_score_correction_bias.squeeze(0)
    return getattr(router, "e_score_correction_bias", None)


def moe_blocks(model) -> list:
    """The sparse MoE blocks in layer order (dense layers, e.g. DeepSeek's first, are skipped)."""
    from slicemoe.models.code_experts import CodeExperts

    def routed(experts) -> bool:
        return hasattr(experts, "gate_up_proj") or isinstance(experts, CodeExperts)

    return [
        m
        for m in model.modules()
        if (hasattr(m, "gate") or hasattr(m, "router")) and routed(getattr(m, "experts", None))
    ]


# Families whose fused expert tensors are stored (E, in, out) rather than (E, out, in).
IN_OUT_EXPERTS = {"gpt_oss"}
EXPERT_BIASES = ("gate_up_proj_bias", "down_proj_bias")  # gpt-oss


# --- shapes, from config.json ----------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What the cache and the hardware model need to know about a model's experts."""

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


@dataclass(frozen=True)
class Dims:
    """What the hardware model needs to know of a model beyond its `Shape`, per MoE layer: the
    whole model's dense weights, KV cache and attention work spread over its MoE layers, so that
    one layer's bill times the MoE layers is the model's. Plain numbers, so a recorded request
    stream carries them and replays without the model."""

    dense_params: float  # non-expert params (attention, dense and shared MLPs, norms)
    head_params: int  # embedding / LM head, vocab x hidden
    kv_values: float  # values cached per token by full-attention layers (MLA: the latent)
    attn_dim: float  # heads x query/key head dim of full-attention layers
    # Sliding-window layers (gpt-oss, Mixtral with a window): their KV and attention stop
    # growing at `window` tokens. Linear-attention and state-space layers keep no KV.
    window_kv_values: float = 0.0
    window_attn_dim: float = 0.0
    window: int = 0


def _attention_layers(c) -> list[str]:
    """Each decoder layer's attention kind: full, sliding or none (linear attention, SSM)."""
    types = getattr(c, "layer_types", None)
    if types is None:
        windowed = getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", True)
        return ["sliding" if windowed else "full"] * c.num_hidden_layers
    kinds = []
    for t in types:
        if "sliding" in t or t == "chunked_attention":
            kinds.append("sliding")
        elif t in ("full_attention", "attention"):
            kinds.append("full")
        else:
            kinds.append("none")
    return kinds


def model_dims(model) -> Dims:
    c = model.config
    blocks = moe_blocks(model)
    total = sum(p.numel() for p in model.parameters())
    # The routed experts' weights (after quantize_model: both paths, or codes held as buffers)
    # are not dense weights.
    experts = sum(p.numel() for b in blocks for p in b.experts.parameters())
    head = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    if getattr(c, "kv_lora_rank", None):
        # Multi-head latent attention caches one compressed vector and the shared rope key.
        kv = c.kv_lora_rank + c.qk_rope_head_dim
    else:
        kv = 2 * kv_heads * head_dim
    attn = c.num_attention_heads * (getattr(c, "qk_head_dim", None) or head_dim)
    kinds = _attention_layers(c)
    m = len(blocks)
    full, sliding = kinds.count("full") / m, kinds.count("sliding") / m
    return Dims(
        dense_params=(total - experts - head) / m,
        head_params=c.vocab_size * c.hidden_size,
        kv_values=kv * full,
        attn_dim=attn * full,
        window_kv_values=kv * sliding,
        window_attn_dim=attn * sliding,
        window=int(getattr(c, "sliding_window", None) or 0) if sliding else 0,
    )


def _config_file(path: str | None) -> Path:
    f = Path(resolve_path(path)) / "config.json"
    if not f.is_file():
        raise FileNotFoundError(
            f"model.path={path!r} has no config.json; point model.path at a local HF checkpoint"
        )
    return f


def _one_line(text: str) -> str:
    return text.splitlines()[0]


@functools.lru_cache(maxsize=16)
def _skeleton(config_file: str, mtime: float):
    """The model built on the meta device from its config.json: every tensor's shape, no
    weights, in about a second even for the largest families."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    # transformers raises many kinds of errors for a config it cannot read or build.
    try:
        config = AutoConfig.from_pretrained(str(Path(config_file).parent))
    except Exception as err:
        raise ValueError(_one_line(f"{config_file}: {type(err).__name__}: {err}")) from None
    gate_rule(config.get_text_config())  # refuses unsupported families with the reason
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as err:
        raise ValueError(
            _one_line(
                f"{config_file}: cannot build the model from it ({type(err).__name__}: {err})"
            )
        ) from None
    if not moe_blocks(model):
        raise ValueError(f"{config_file}: model type {config.model_type!r} has no MoE blocks")
    return model


def skeleton(path: str | None):
    f = _config_file(path)
    return _skeleton(str(f), f.stat().st_mtime)


def read_shape(path: str | None) -> Shape:
    """The experts' shape, from config.json alone (no weights are read)."""
    model = skeleton(path)
    blocks = moe_blocks(model)
    ex = blocks[0].experts
    e, a, b = ex.down_proj.shape  # (E, H, I), or (E, I, H) where stored (in, out)
    hidden, inter = (b, a) if model.config.model_type in IN_OUT_EXPERTS else (a, b)
    bias = sum(getattr(ex, n)[0].numel() for n in EXPERT_BIASES if hasattr(ex, n))
    top_k = gate_rule(model.config).top_k
    return Shape(len(blocks), e, top_k, hidden, inter, bias)
