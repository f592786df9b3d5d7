"""Configs packed into one model pass against the same configs one pass each.

Cache-aware configs (Cache-Prior at three strengths, Cumsum and Max-Rank, at two cache sizes)
record their request streams alone (`slicemoe.run.record`, one pass each) and then all in one
pass (`slicemoe.run.record_packed`, each its own rows of every batch), in one process on one
device. It prints both times and, per config, how far the packed stream is from the solo one:
expert choices that differ, and the replayed miss rate, decode energy and accuracy. On the CPU
they are identical (tests/test_benchmark_packing.py); on CUDA a row's float sums may depend on
the batch it is in, which is what this measures.

    python benchmarks/packing.py                         # the tiny model, 40 problems, GPU if any
    python benchmarks/packing.py --small --device cpu    # CI: two configs, two problems
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from slicemoe.config import CacheConfig, EvalConfig, ModelConfig, PolicyConfig, RunConfig
from slicemoe.run import load, record, record_packed, replay

POLICIES = {
    "cache_prior_0.1": PolicyConfig(routing="cache_prior", precision="high", lam=0.1),
    "cache_prior_0.2": PolicyConfig(routing="cache_prior", precision="high", lam=0.2),
    "cache_prior_0.3": PolicyConfig(routing="cache_prior", precision="high", lam=0.3),
    "cumsum": PolicyConfig(routing="cumsum", precision="high"),
    "max_rank": PolicyConfig(routing="max_rank", precision="high"),
}
COMPARED = ("miss_rate", "energy_decode_j_per_token", "accuracy")


def configs(small: bool, device: str, limit: int, max_new: int) -> dict[str, RunConfig]:
    base = RunConfig(
        model=ModelConfig(device=device),
        eval=EvalConfig(limit=limit, max_new_tokens=max_new),
        batch_size=limit * (2 if small else len(POLICIES) * 2),
    )
    names = ["cache_prior_0.1", "cumsum"] if small else list(POLICIES)
    fracs = [0.1] if small else [0.1, 0.25]
    return {
        f"{name} frac={frac}": replace(base, policy=POLICIES[name], cache=CacheConfig(frac=frac))
        for name in names
        for frac in fracs
    }


def difference(solo, packed, cfg: RunConfig) -> dict:
    """How far a packed stream is from its config's solo stream."""
    same_steps = np.array_equal(solo.decode_steps, packed.decode_steps)
    choices = float((solo.experts != packed.experts).mean()) if same_steps else float("nan")
    a, b = replay(solo, cfg), replay(packed, cfg)
    return {
        "sequences_other_length": int((solo.decode_steps != packed.decode_steps).sum()),
        "expert_choices_differing": choices,
        **{f"{m}_difference": abs(a[m] - b[m]) for m in COMPARED},
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="two configs, two problems")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--limit", type=int, help="problems per config (default 40; --small: 2)")
    p.add_argument("--max-new", type=int, help="new tokens (default 64; --small: 6)")
    p.add_argument("--json", type=Path, help="write the row as JSON here")
    a = p.parse_args(argv)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    )
    limit = a.limit or (2 if a.small else 40)
    cfgs = configs(a.small, str(device), limit, a.max_new or (6 if a.small else 64))
    loaded = load(next(iter(cfgs.values())))
    if device.type == "cuda":  # warm: kernels compiled, memory pools allocated
        record(next(iter(cfgs.values())), loaded)
        sync(device)
    t = time.perf_counter()
    solo = {name: record(cfg, loaded) for name, cfg in cfgs.items()}
    sync(device)
    solo_s = time.perf_counter() - t
    t = time.perf_counter()
    packed = dict(zip(cfgs, record_packed(list(cfgs.values()), loaded)))
    sync(device)
    packed_s = time.perf_counter() - t
    rows = {name: difference(solo[name], packed[name], cfg) for name, cfg in cfgs.items()}
    row = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "configs": len(cfgs),
        "problems": limit,
        "solo_s": solo_s,
        "packed_s": packed_s,
        "speedup": solo_s / packed_s,
        "per_config": rows,
    }
    print(
        f"{len(cfgs)} configs x {limit} problems on {row['device']}: one pass each {solo_s:.2f} s,"
        f" packed into one {packed_s:.2f} s ({row['speedup']:.2f}x)"
    )
    print("| config | sequences of another length | expert choices differing | "
          + " | ".join(f"{m} difference" for m in COMPARED) + " |")  # fmt: skip
    print("|---" * (3 + len(COMPARED)) + "|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['sequences_other_length']} | {r['expert_choices_differing']:.2e} | "
            + " | ".join(f"{r[f'{m}_difference']:.2e}" for m in COMPARED)
            + " |"
        )
    if a.json:
        a.json.write_text(json.dumps(row, indent=1))
    return row


if __name__ == "__main__":
    main()
