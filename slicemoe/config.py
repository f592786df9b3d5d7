"""Run configuration as plain dataclasses.

These are the schema of one run (DESIGN.md section 1). They double as Hydra structured configs
(the sweep registers them), but nothing here imports Hydra: a run can be built in a notebook
with `RunConfig(cache=CacheConfig(frac=0.25))`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ModelConfig:
    name: str = "tiny"
    # Local directory (or hub id where a network exists). None = the shipped tiny checkpoint.
    path: Optional[str] = None
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Where the simulated devices' state lives (slicemoe.simulator): python (the reference, on
    # the host), tensor (on the model's device), auto (tensor on CUDA). Same metrics either way.
    backend: str = "auto"


@dataclass
class BitsConfig:
    name: str = "mat84"
    # high=None means no expert quantization (fp16/fp32 weights as loaded).
    high: Optional[int] = 8
    # low=None means a single precision (no Matryoshka slicing).
    low: Optional[int] = 4
    scheme: str = "amat"  # amat | trunc | base
    symmetric: bool = False
    group: int = 32
    # Non-expert weights: symmetric INT8 group 128 in the paper; None leaves them as loaded.
    nonexpert_bits: Optional[int] = 8
    nonexpert_group: int = 128


@dataclass
class CacheConfig:
    name: str = "frac_25"
    # Exactly one of the two: bytes, or a fraction of the reference size of all routed experts
    # (1 byte per weight, INT8 without metadata; slicemoe.quant.REFERENCE_BITS). The reference
    # does not depend on `bits`, so one frac is one DRAM budget for every bit width.
    frac: Optional[float] = 0.25
    bytes: Optional[int] = None
    # lru | lfu | fifo | belady | arc | slru | s3fifo | lrfu | lecar | least_stale
    # (slicemoe.cache.reference.EVICTION); the parameters below are those policies'.
    eviction: str = "lru"
    slru_protected: float = 0.8  # slru: share of the capacity the protected segment may hold
    s3fifo_small: float = 0.1  # s3fifo: share of the capacity of the small FIFO
    # lrfu: weight of recency, in [0, 1]: 0 ranks by use counts (LFU), 1 by recency (LRU). Age
    # counts requests (layers x top-k a token): on the tiny model's streams 0.1 already evicts
    # as LRU and 0.001 as LFU; 0.01 lies between.
    lrfu_lambda: float = 0.01
    lecar_learning_rate: float = 0.45  # lecar: the paper's learning rate


@dataclass
class PolicyConfig:
    name: str = "dbsc"
    routing: str = "topk"  # topk | cache_prior | cumsum | max_rank
    precision: str = "dbsc"  # high | low | dbsc
    tau: float = 0.5  # DBSC: critical when normalised gate score >= tau
    # A decode expert call whose slices are not all in DRAM (docs/simulator.md): fetch them |
    # skip_lsb (compute on the MSB slice when the LSB one misses) | drop (leave out a missed
    # expert whose normalised gate score is below drop_below) | substitute (serve a high-bit call
    # from its resident low-bit slice)
    on_miss: str = "fetch"
    # drop's threshold. 0.1: an expert with under a tenth of its token's gate mass moves the
    # output little, and 0.1 is below 1/k for every top-k up to 10, so it never reaches a token's
    # highest-scoring expert (which is never dropped anyway).
    drop_below: float = 0.1
    lam: float = 0.0  # cache_prior strength (multiplies the max-min logit range)
    # The range lam multiplies: `token` = this token's own max-min router logit; `running` = the
    # running mean of that range over the tokens this device has routed at this layer
    # (Skliar et al.'s definition, so their lambda values transfer).
    lam_scale: str = "token"
    cumsum_p: float = 0.9  # cumsum: cumulative-probability threshold for candidates
    max_rank_keep: int = 1  # max_rank: top-J always kept
    max_rank_m: int = 8  # max_rank: cached experts within rank M may fill the rest
    warmup: str = "lru"  # empty | last_layer | random | lru | pcw
    # Decode steps of grace before the miss-rate controller acts (the paper's 10). Metrics cover
    # every decode step; the `*_steady` variants start after these steps.
    warmup_steps: int = 10
    # Optional online controller: adapt lam to hold miss_rate_hbn under this target.
    miss_rate_target: Optional[float] = None


@dataclass
class HardwareConfig:
    """Energy/latency model parameters; defaults are the SliceMoE mobile platform."""

    name: str = "mobile_lpddr4_ufs31"
    xpu_tops: float = 16.4
    xpu_tops_per_w: float = 3.18
    dram_gbps: float = 104.0  # gigabit/s
    dram_pj_per_bit: float = 1.5
    dram_gb: float = 8.0  # gigabyte
    flash_gbps: float = 10.0
    flash_pj_per_bit: float = 103.0
    flash_gb: float = 128.0
    kv_bits: int = 8
    act_bits: int = 16
    # An FP16 MAC costs this many INT8 MACs of time and energy (the TOPS figures are INT8);
    # charged for unquantized experts (bits.high=null) and non-expert weights left unquantized.
    fp16_op_cost: float = 2.0
    overlap_flash: bool = False  # True: Flash time overlaps compute/DRAM time of the layer


@dataclass
class EvalConfig:
    task: str = "arith"  # arith | gsm8k | wikitext
    limit: Optional[int] = 40  # number of documents (None = all)
    num_fewshot: int = 5
    max_new_tokens: int = 64
    data_path: Optional[str] = None  # gsm8k dir with train/test jsonl, or a text file
    seq_len: int = 256  # wikitext window
    stride: int = 256  # wikitext stride
    seed: int = 1234


@dataclass
class PrefetchConfig:
    """Fetching the next layer's experts ahead of time (slicemoe.prefetch)."""

    name: str = "none"
    predictor: str = "none"  # none | next_gate | prev_token | oracle
    top_m: int = 0  # experts prefetched per layer and token; 0 = the model's top-k
    # msb: the MSB slice (a whole expert when unsliced); critical: MSB+LSB for experts whose
    # predicted gate weight DBSC's tau marks critical, MSB for the rest
    slices: str = "msb"
    insert: str = "mru"  # where prefetched slices enter the eviction order: mru | lru


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    bits: BitsConfig = field(default_factory=BitsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    seed: int = 0
    # Independent sequences simulated at once, each with its own cache: an integer, or "auto"
    # (slicemoe.batching: on CUDA the most that fit the GPU's free memory). `Any` because
    # OmegaConf's structured configs take no int-or-str union; slicemoe.validate checks it.
    batch_size: Any = "auto"
    trace: bool = False  # record every slice request to a parquet file
    trace_path: Optional[str] = None
    # Replay the requests of a router trace (slicemoe.traces, docs/traces.md) instead of running
    # the model: no weights are loaded, the model's config.json gives its shape. Not `trace`,
    # which names the per-request output above.
    stream_file: Optional[str] = None


# What configs packed into one model pass must share: each config's rows then see the same
# prompts, padding and batches as they would alone (slicemoe.run.record_packed).
PACKED_ALIKE = ("model", "bits", "eval", "seed", "batch_size")
