"""A run's config checked before any work, and the cache size it asks for.

Every check names the field and the fix (DESIGN.md section 8), so a sweep refuses a bad job
before it loads a model.
"""

from __future__ import annotations

import re
from pathlib import Path

from slicemoe.cache import EVICTION
from slicemoe.cache.tensor import EVICTIONS as TENSOR_EVICTIONS
from slicemoe.config import RunConfig
from slicemoe.device import ON_MISS
from slicemoe.eval import TASKS, get_task
from slicemoe.models import Shape, check_checkpoint, checkpoint_dir, config_dir, read_shape
from slicemoe.prefetch import PREDICTORS
from slicemoe.quant import reference_bytes, slice_bytes
from slicemoe.ranges import INF, ConfigError, check_bounds
from slicemoe.routing import ROUTING
from slicemoe.stream import cache_independent
from slicemoe.warmup import WARMUP

BACKENDS = ("auto", "python", "tensor")  # slicemoe.simulator


# --- validation ------------------------------------------------------------------------------

# Every number of the schema with a range (slicemoe.ranges.check_bounds).
BOUNDS = (
    ("bits.group", 1, INF, False),
    ("bits.nonexpert_bits", 2, 8, False),
    ("bits.nonexpert_group", 1, INF, False),
    ("cache.frac", 0, INF, True),
    ("cache.bytes", 1, INF, False),
    ("cache.slru_protected", 0, 1, True),
    ("cache.s3fifo_small", 0, 1, True),
    ("cache.lrfu_lambda", 0, 1, False),
    ("cache.lecar_learning_rate", 0, INF, True),
    ("policy.tau", 0, INF, False),
    ("policy.drop_below", 0, 1, False),
    ("policy.lam", 0, INF, False),
    ("policy.cumsum_p", 0, 1, True),
    ("policy.max_rank_keep", 0, INF, False),
    ("policy.max_rank_m", 1, INF, False),
    ("policy.warmup_steps", 0, INF, False),
    ("policy.miss_rate_target", 0, 1, False),
    ("hardware.xpu_tops", 0, INF, True),
    ("hardware.xpu_tops_per_w", 0, INF, True),
    ("hardware.dram_gbps", 0, INF, True),
    ("hardware.dram_pj_per_bit", 0, INF, False),
    ("hardware.dram_gb", 0, INF, True),
    ("hardware.flash_gbps", 0, INF, True),
    ("hardware.flash_pj_per_bit", 0, INF, False),
    ("hardware.flash_gb", 0, INF, True),
    ("hardware.kv_bits", 1, 32, False),
    ("hardware.act_bits", 1, 32, False),
    ("hardware.fp16_op_cost", 0, INF, True),
    ("eval.limit", 1, INF, False),
    ("eval.num_fewshot", 0, INF, False),
    ("eval.max_new_tokens", 1, INF, False),
    ("eval.seq_len", 2, INF, False),
    ("eval.stride", 1, INF, False),
    # numpy and torch take seeds in [0, 2**32).
    ("seed", 0, 2**32 - 1, False),
    ("prefetch.top_m", 0, INF, False),
)
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def validate(cfg: RunConfig, weights: bool = True) -> None:
    """Fail before any work with a message naming the field and the fix. `weights=False`
    checks a real model's config against its shipped config.json, before model.path is set."""
    b, p, c, e = cfg.bits, cfg.policy, cfg.cache, cfg.eval
    check_bounds(cfg, BOUNDS)
    n = cfg.batch_size
    if n != "auto" and not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        raise ConfigError("batch_size", f"{n!r} is not a batch size; use an integer >= 1 or auto")
    if b.high is not None and not 2 <= b.high <= 8:
        raise ConfigError("bits.high", f"{b.high} is out of range; use 2..8 or null for fp16")
    if b.low is not None:
        if b.high is None:
            raise ConfigError("bits.low", "slicing needs quantized experts; set bits.high too")
        allowed = f"use 1..{b.high - 1} (a slice keeps at least one bit, below bits.high)"
        if b.low < 1:
            raise ConfigError("bits.low", f"low bits {b.low} must be at least 1; {allowed}")
        if b.low >= b.high:
            raise ConfigError(
                "bits.low", f"low bits {b.low} must be below bits.high={b.high}; {allowed}"
            )
    if b.scheme not in ("amat", "trunc", "base"):
        raise ConfigError("bits.scheme", f"{b.scheme!r} is unknown; use amat, trunc or base")
    if p.routing not in ROUTING:
        raise ConfigError(
            "policy.routing", f"{p.routing!r} is unknown; use one of {sorted(ROUTING)}"
        )
    if p.precision not in ("high", "low", "dbsc"):
        raise ConfigError("policy.precision", f"{p.precision!r} is unknown; use high, low or dbsc")
    if p.precision != "high" and b.low is None:
        raise ConfigError(
            "policy.precision",
            f"{p.precision} needs Matryoshka bits (bits.low); pick bits=mat84/mat63/mat42",
        )
    if p.warmup not in WARMUP:
        raise ConfigError("policy.warmup", f"{p.warmup!r} is unknown; use one of {sorted(WARMUP)}")
    if hasattr(p, "lsb_miss"):  # set on a PolicyConfig by hand: it would change nothing
        raise ConfigError(
            "policy.lsb_miss",
            "renamed policy.on_miss; use on_miss=fetch, or on_miss=skip_lsb for lsb_miss=skip",
        )
    if p.on_miss not in ON_MISS:
        raise ConfigError("policy.on_miss", f"{p.on_miss!r} is unknown; use {', '.join(ON_MISS)}")
    if p.on_miss == "skip_lsb" and b.scheme == "base":
        raise ConfigError(
            "policy.on_miss",
            "skip_lsb needs nested slices; bits.scheme=base keeps two whole copies (no LSB "
            "slice): use policy.on_miss=substitute (the low-bit copy serves) or bits.scheme=amat",
        )
    if p.lam_scale not in ("token", "running"):
        raise ConfigError("policy.lam_scale", f"{p.lam_scale!r} is unknown; use token or running")
    if p.miss_rate_target is not None and p.routing != "cache_prior":
        raise ConfigError(
            "policy.miss_rate_target",
            "the online controller adapts cache_prior's lambda; set policy.routing=cache_prior",
        )
    if c.eviction not in EVICTION:
        raise ConfigError(
            "cache.eviction", f"{c.eviction!r} is unknown; use one of {sorted(EVICTION)}"
        )
    if c.eviction == "belady":
        # The oracle replays a recorded request sequence, so requests must not depend on the
        # cache, and warmup must not insert (an insert is not a request of that sequence).
        if p.routing != "topk" or p.on_miss != "fetch" or p.warmup in ("random", "pcw"):
            raise ConfigError(
                "cache.eviction",
                "belady needs cache-independent requests: policy.routing=topk, "
                "policy.on_miss=fetch and a warmup that inserts nothing (lru/empty/last_layer)",
            )
    if (c.frac is None) == (c.bytes is None):
        raise ConfigError("cache", "set exactly one of cache.frac and cache.bytes (the other null)")
    if e.stride > e.seq_len:
        raise ConfigError("eval.stride", f"{e.stride} must not exceed eval.seq_len={e.seq_len}")
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError("model.dtype", "use float32, bfloat16 or float16")
    if not DEVICE.fullmatch(cfg.model.device):
        raise ConfigError(
            "model.device", f"{cfg.model.device!r} is unknown; use auto, cpu, cuda or cuda:N"
        )
    if cfg.trace_path is not None and not Path(cfg.trace_path).parent.is_dir():
        raise ConfigError(
            "trace_path",
            f"the folder of {cfg.trace_path} does not exist; create it or drop trace_path",
        )
    m = cfg.model
    try:
        if weights and cfg.stream_file is None:  # a trace replays without the weights
            check_checkpoint(checkpoint_dir(m.name, m.path))
        shape = read_shape(config_dir(m.name, m.path))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError("model.path", str(err)) from None
    sizes = expert_sizes(cfg, shape)
    need = max(sizes["MSB"], sizes["FULL"] if p.precision == "high" else 0)
    if capacity_bytes(cfg, shape) < need:
        raise ConfigError(
            "cache",
            f"capacity {capacity_bytes(cfg, shape):,} B is below one expert slice ({need:,} B); "
            "raise cache.frac or cache.bytes",
        )
    for name, dim in (("hidden size", shape.hidden), ("expert width", shape.moe_intermediate)):
        if b.high is not None and dim % b.group:
            raise ConfigError(
                "bits.group",
                f"{b.group} does not divide the model's {name} {dim}; pick a divisor (e.g. 32)",
            )
    if m.backend not in BACKENDS:
        raise ConfigError("model.backend", f"{m.backend!r} is unknown; use one of {BACKENDS}")
    if m.backend == "tensor" and (cfg.trace or c.eviction not in TENSOR_EVICTIONS):
        raise ConfigError(
            "model.backend",
            f"tensor keeps no per-request trace and has only {', '.join(TENSOR_EVICTIONS)} "
            f"eviction; use model.backend=python (or auto) with trace=true or "
            f"cache.eviction={c.eviction}",
        )
    if m.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("model.device", "no CUDA device here; use auto or cpu")
        index = int(m.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(
                "model.device",
                f"{m.device}: this machine has {torch.cuda.device_count()} CUDA devices",
            )
    if p.routing == "max_rank" and not p.max_rank_keep <= shape.top_k:
        raise ConfigError(
            "policy.max_rank_keep",
            f"{p.max_rank_keep} experts always kept exceed the model's top-k={shape.top_k}",
        )
    check_prefetch(cfg, shape)
    task = get_task_or_error(e.task)
    if cfg.stream_file is not None:
        # The trace stands for the model pass: no task data is read.
        from slicemoe.traces import check  # it raises ConfigError: imported here, not at the top

        check(cfg)
        return
    if e.data_path is not None and not Path(e.data_path).exists():
        raise ConfigError("eval.data_path", f"{e.data_path} does not exist; point it at the data")
    if task.check_data is not None:
        try:
            task.check_data(e.data_path)
        except ValueError as err:
            message = str(err).removeprefix("eval.data_path").lstrip("= ")
            raise ConfigError("eval.data_path", message) from None


def check_prefetch(cfg: RunConfig, shape: Shape) -> None:
    f = cfg.prefetch
    if f.predictor not in PREDICTORS:
        raise ConfigError(
            "prefetch.predictor", f"{f.predictor!r} is unknown; use one of {PREDICTORS}"
        )
    if f.slices not in ("msb", "critical"):
        raise ConfigError("prefetch.slices", f"{f.slices!r} is unknown; use msb or critical")
    if f.insert not in ("mru", "lru"):
        raise ConfigError("prefetch.insert", f"{f.insert!r} is unknown; use mru or lru")
    if f.top_m != 0 and not shape.top_k <= f.top_m <= shape.num_experts:
        raise ConfigError(
            "prefetch.top_m",
            f"{f.top_m} must be 0 (the model's top-k) or between top-k={shape.top_k} and the "
            f"{shape.num_experts} experts",
        )
    if f.predictor == "none":
        return
    if cfg.cache.eviction == "belady":
        raise ConfigError(
            "prefetch.predictor", "Belady's oracle cache replays a recorded pass; use prefetch=none"
        )
    if f.predictor == "oracle" and not cache_independent(cfg):
        raise ConfigError(
            "prefetch.predictor",
            "oracle reads the future from a recorded pass, so requests must not depend on the "
            "cache: policy.routing=topk, policy.on_miss=fetch, no policy.miss_rate_target",
        )


def get_task_or_error(name: str):
    try:
        return get_task(name)
    except ValueError:
        raise ConfigError("eval.task", f"{name!r} is unknown; use one of {sorted(TASKS)}") from None


def expert_sizes(cfg: RunConfig, shape: Shape) -> dict:
    b = cfg.bits
    return slice_bytes(shape.expert_params, b.high, b.low, b.group, b.symmetric, shape.expert_bias)


def capacity_bytes(cfg: RunConfig, shape: Shape) -> int:
    """DRAM bytes for routed-expert slices: cache.bytes, or cache.frac of all routed experts at
    the 8-bit reference size (the same bytes for every bit width)."""
    if cfg.cache.bytes is not None:
        return int(cfg.cache.bytes)
    total = shape.num_moe_layers * shape.num_experts * reference_bytes(shape.expert_params)
    return int(cfg.cache.frac * total)
