"""What a run reports, and over which decode steps, phases and bytes.

The simulator keeps one row of `COUNTERS` per decode step (summed over the simulated devices)
and the prefill phase's hardware cost. Every decode metric is computed from the rows of one
window, so misses, bytes, energy, token counts and precision shares always cover the same steps:
- the unsuffixed names cover every decode step, from the first token after the prompt;
- the `_steady` names cover the steps from `policy.warmup_steps` on (the window the paper's
  miss-rate constraint applies to, after the cache has settled).
Decode step t is the forward pass that consumes generated token t (teacher-forced token t for
perplexity tasks) on every device still running; its requests are all routed-expert slice
requests of all MoE layers of that pass. Prefill metrics cover the prompt's forward pass and the
warmup at the prefill -> decode switch.
"""

from __future__ import annotations

import numpy as np

from slicemoe.cache import KINDS
from slicemoe.hardware import Cost

# The slicemoe.hardware.Cost fields kept per decode step.
COST_COUNTERS = ("ops", "dram_bytes", "flash_bytes", "compute_j", "dram_j", "flash_j", "latency_s")
COUNTERS = (
    *(f"requests_{k}" for k in KINDS),
    *(f"misses_{k}" for k in KINDS),
    "activations",  # routed-expert calls that requested slices
    "expert_calls",  # routed-expert calls, all precisions
    "highbit_calls",  # ... computed on the high-bit path
    "dropped_calls",  # ... not computed (policy.on_miss=drop)
    "tokens",  # decode tokens (one per device per step)
    "resident_sum",  # experts with an MSB/FULL slice in DRAM at layer 0, summed over tokens
    "prefetch_bytes",  # Flash bytes fetched ahead of their request (part of flash_bytes)
    "prefetch_used_bytes",  # ... requested before they were evicted
    "predicted_calls",  # expert calls of layer steps a prefetch prediction was made for
    "covered_calls",  # ... whose expert was among the predicted ones
    *COST_COUNTERS,
)
COL = {name: i for i, name in enumerate(COUNTERS)}

TASK_DOCS = {
    "accuracy": "task score (exact match) over all documents",
    "accuracy_flexible": "task score with flexible answer extraction (gsm8k)",
    "perplexity": "exp(mean NLL) over all scored tokens (wikitext)",
}
DECODE_DOCS = {
    "miss_rate": "slice misses / slice requests, all kinds",
    "miss_rate_hbn": "demand Flash bytes / (expert activations x this configuration's high-bit "
    "expert bytes): the paper's high-bit-normalised miss rate",
    "miss_rate_refn": "demand Flash bytes / (expert activations x reference expert bytes at 8 "
    "bits): the same unit for every bit width",
    "miss_rate_msb": "misses / requests of MSB slices and whole experts (FULL)",
    "miss_rate_lsb": "misses / requests of LSB slices",
    "flash_bytes_decode": "bytes read from Flash: demand misses and prefetches",
    "flash_bytes_demand": "bytes read from Flash on demand (misses)",
    "flash_bytes_prefetch": "bytes read from Flash ahead of their request (prefetch)",
    "flash_bytes_per_token": "flash_bytes_decode / decode_tokens",
    "prefetch_recall": "expert calls whose expert was predicted (and so prefetched, unless in "
    "DRAM already) / expert calls of the layer steps a prediction was made for",
    "prefetch_precision": "prefetched bytes requested before eviction / prefetched bytes (in a "
    "window that starts mid-run, layer 0 may use bytes prefetched in the step before it)",
    "dram_bytes_decode": "DRAM traffic: weights read, KV cache read/written, Flash fills",
    "energy_decode_j": "XPU + DRAM + Flash energy",
    "energy_decode_compute_j": "XPU energy",
    "energy_decode_dram_j": "DRAM energy",
    "energy_decode_flash_j": "Flash energy",
    "energy_decode_j_per_token": "energy_decode_j / decode_tokens",
    "latency_decode_s": "modelled latency, summed over devices",
    "latency_decode_s_per_token": "latency_decode_s / decode_tokens",
    "decode_tokens": "decode steps summed over devices",
    "highbit_fraction": "routed-expert calls computed on the high-bit path / all calls",
    "cached_experts_mean": "experts with an MSB/FULL slice in DRAM, mean over decode tokens",
    "dropped_fraction": "routed-expert calls left out on a miss (policy.on_miss=drop) / all calls",
}
PREFILL_DOCS = {
    "prefill_tokens": "prompt tokens",
    "energy_prefill_j": "prefill and warmup energy",
    "energy_prefill_j_per_token": "energy_prefill_j / prefill_tokens",
    "latency_prefill_s": "prefill and warmup latency, summed over devices",
    "latency_prefill_s_per_token": "latency_prefill_s / prefill_tokens",
    "flash_bytes_prefill": "bytes read from Flash in prefill, warmup fills included",
    "flash_bytes_warmup": "bytes a warmup strategy read from Flash (slices prefill did not stream)",
    "dram_bytes_prefill": "DRAM traffic of prefill and warmup",
}
RUN_DOCS = {
    "cache_capacity_bytes": "DRAM capacity for routed-expert slices, bytes",
    "wall_s": "wall-clock seconds of the run",
}
STEADY = "_steady"
DOCS = {
    **TASK_DOCS,
    **DECODE_DOCS,
    **{f"{k}{STEADY}": f"{v}; decode steps >= policy.warmup_steps" for k, v in DECODE_DOCS.items()},
    **PREFILL_DOCS,
    **RUN_DOCS,
}
METRICS = tuple(DOCS)


def stats_row(stats) -> np.ndarray:
    """A cache's cumulative statistics (slicemoe.cache.Stats) as a COUNTERS row, the columns
    they do not cover zero."""
    v = np.zeros(len(COUNTERS))
    for kind in KINDS:
        v[COL[f"requests_{kind}"]] = stats.requests[kind]
        v[COL[f"misses_{kind}"]] = stats.requests[kind] - stats.hits[kind]
    v[COL["activations"]] = stats.activations
    v[COL["prefetch_bytes"]] = stats.prefetch_bytes
    v[COL["prefetch_used_bytes"]] = stats.prefetch_used_bytes
    return v


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("nan")


def decode_metrics(rows: np.ndarray, highbit_bytes: int, reference_bytes: int) -> dict:
    """The DECODE_DOCS metrics of the decode steps in `rows` ([steps, COUNTERS])."""
    c = {name: float(v) for name, v in zip(COUNTERS, rows.sum(0))}
    req = {k: c[f"requests_{k}"] for k in KINDS}
    miss = {k: c[f"misses_{k}"] for k in KINDS}
    flash, tokens = c["flash_bytes"], c["tokens"]
    demand = flash - c["prefetch_bytes"]
    energy = c["compute_j"] + c["dram_j"] + c["flash_j"]
    return {
        "miss_rate": _ratio(sum(miss.values()), sum(req.values())),
        "miss_rate_hbn": _ratio(demand, c["activations"] * highbit_bytes),
        "miss_rate_refn": _ratio(demand, c["activations"] * reference_bytes),
        "miss_rate_msb": _ratio(miss["MSB"] + miss["FULL"], req["MSB"] + req["FULL"]),
        "miss_rate_lsb": _ratio(miss["LSB"], req["LSB"]),
        "flash_bytes_decode": flash,
        "flash_bytes_demand": demand,
        "flash_bytes_prefetch": c["prefetch_bytes"],
        "flash_bytes_per_token": _ratio(flash, tokens),
        "prefetch_recall": _ratio(c["covered_calls"], c["predicted_calls"]),
        "prefetch_precision": _ratio(c["prefetch_used_bytes"], c["prefetch_bytes"]),
        "dram_bytes_decode": c["dram_bytes"],
        "energy_decode_j": energy,
        "energy_decode_compute_j": c["compute_j"],
        "energy_decode_dram_j": c["dram_j"],
        "energy_decode_flash_j": c["flash_j"],
        "energy_decode_j_per_token": _ratio(energy, tokens),
        "latency_decode_s": c["latency_s"],
        "latency_decode_s_per_token": _ratio(c["latency_s"], tokens),
        "decode_tokens": tokens,
        "highbit_fraction": _ratio(c["highbit_calls"], c["expert_calls"]),
        "cached_experts_mean": _ratio(c["resident_sum"], tokens),
        "dropped_fraction": _ratio(c["dropped_calls"], c["expert_calls"]),
    }


def prefill_metrics(cost: Cost, warmup_flash_bytes: float, prompt_tokens: int) -> dict:
    return {
        "prefill_tokens": float(prompt_tokens),
        "energy_prefill_j": cost.energy_j,
        "energy_prefill_j_per_token": _ratio(cost.energy_j, prompt_tokens),
        "latency_prefill_s": cost.latency_s,
        "latency_prefill_s_per_token": _ratio(cost.latency_s, prompt_tokens),
        "flash_bytes_prefill": cost.flash_bytes,
        "flash_bytes_warmup": float(warmup_flash_bytes),
        "dram_bytes_prefill": cost.dram_bytes,
    }


def curves(rows: np.ndarray) -> dict:
    """Per decode step, from step 0: the running and the per-step miss rate, cumulative energy."""
    req = rows[:, [COL[f"requests_{k}"] for k in KINDS]].sum(1)
    miss = rows[:, [COL[f"misses_{k}"] for k in KINDS]].sum(1)
    energy = rows[:, [COL["compute_j"], COL["dram_j"], COL["flash_j"]]].sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        running = np.cumsum(miss) / np.cumsum(req)
        step = miss / req
    return {
        "miss_rate_running": running.tolist(),
        "miss_rate_step": step.tolist(),
        "energy_decode_cum_j": np.cumsum(energy).tolist(),
    }


def assemble(
    cfg,
    rows,
    prefill: Cost,
    warmup_bytes,
    prompt_tokens,
    scores,
    capacity,
    highbit,
    reference,
    layer_calls=None,
) -> dict:
    """A run's metrics dict (METRICS, in order, plus "curves" and "problems") from its per-step
    decode rows, the prefill cost and the task scores; the model pass and the replay both end
    here.
    `scores`: task metric -> per-problem values (one perplexity for loglik tasks);
    `layer_calls`: per MoE layer, (expert calls predicted for, calls covered) when prefetching.
    "problems" holds a generation task's correctness per problem, in problem order, so that
    runs of one task and limit compare problem by problem (McNemar); None for perplexity."""
    nan = float("nan")
    out = {k: float(np.mean(scores[k])) if scores.get(k) else nan for k in TASK_DOCS}
    out.update(decode_metrics(rows, highbit, reference))
    steady = decode_metrics(rows[cfg.policy.warmup_steps :], highbit, reference)
    out.update({f"{k}{STEADY}": v for k, v in steady.items()})
    out.update(prefill_metrics(prefill, warmup_bytes, prompt_tokens))
    out["cache_capacity_bytes"] = float(capacity)
    out["curves"] = curves(rows)
    out["problems"] = None
    if "accuracy" in scores:
        correct = [int(v) for v in scores["accuracy"]]
        out["problems"] = {"correct": correct, "task": cfg.eval.task, "limit": cfg.eval.limit}
    if cfg.prefetch.predictor != "none":
        predicted, covered = layer_calls
        with np.errstate(invalid="ignore", divide="ignore"):
            out["curves"]["prefetch_recall_layer"] = (covered / predicted).tolist()
    return out
