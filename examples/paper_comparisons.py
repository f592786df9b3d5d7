"""The paper's comparisons on the shipped tiny model, as markdown tables: the tables of
docs/paper.md.

    python examples/paper_comparisons.py [--limit 100] [--workers 2] [--tables warmup,tradeoff,baseline]

- warmup: cache initial states (Fig. 10 shape) under DBSC, all-steps and steady-state windows;
- tradeoff: high-bit LRU, low-bit LRU and DBSC per bit width at one DRAM budget (Fig. 8 shape);
- baseline: DBSC against the paper's baseline, high-bit Cache-Prior, over its lambda, per
  decoded token, and the ratio at matched accuracy (Fig. 9 shape).
Every row is one `slicemoe.run.run` on the CPU (one torch thread per worker process).
"""

from __future__ import annotations

import argparse
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

from slicemoe.config import BitsConfig, CacheConfig, EvalConfig, PolicyConfig, RunConfig

BITS = {
    "fp16": BitsConfig(name="fp16", high=None, low=None),
    "mat84": BitsConfig(name="mat84", high=8, low=4),
    "mat63": BitsConfig(name="mat63", high=6, low=3),
    "mat42": BitsConfig(name="mat42", high=4, low=2),
}
HIGH = PolicyConfig(name="lru_highbit", precision="high")
LOW = PolicyConfig(name="lru_lowbit", precision="low")
DBSC = PolicyConfig(name="dbsc", precision="dbsc", tau=0.5)
PCW = replace(DBSC, name="dbsc_pcw", warmup="pcw")


def cache_prior(lam: float, scale: str = "token") -> PolicyConfig:
    return PolicyConfig(
        name="cache_prior_highbit", routing="cache_prior", precision="high", lam=lam,
        lam_scale=scale,
    )  # fmt: skip


def _run(cfg: RunConfig) -> dict:
    import torch

    from slicemoe.run import load, run

    torch.set_num_threads(1)
    return run(cfg, load(cfg))


def rows(limit: int, tables: list[str]) -> list[tuple[str, str, RunConfig]]:
    base = RunConfig(eval=EvalConfig(limit=limit), cache=CacheConfig(frac=0.25))
    out = []
    if "warmup" in tables:
        for w in ("empty", "last_layer", "random", "lru", "pcw"):
            pol = replace(DBSC, name=f"dbsc warmup={w}", warmup=w)
            out.append(("warmup", f"mat42 {pol.name}", replace(base, bits=BITS["mat42"], policy=pol)))
    if "tradeoff" in tables:
        grid = [("fp16", HIGH), *((b, p) for b in ("mat84", "mat63", "mat42") for p in (HIGH, LOW, DBSC))]
        grid.append(("mat42", replace(DBSC, name="dbsc tau=0.3", tau=0.3)))
        for b, pol in grid:
            out.append(("tradeoff", f"{b} {pol.name}", replace(base, bits=BITS[b], policy=pol)))
    if "baseline" in tables:
        for lam in (0.0, 0.05, 0.1, 0.2, 0.3, 0.5):
            pol = cache_prior(lam)
            out.append(("baseline", f"mat84 cache_prior_highbit lam={lam}", replace(base, bits=BITS["mat84"], policy=pol)))
        for lam in (0.1, 0.3):
            pol = cache_prior(lam, "running")
            out.append(("baseline", f"mat84 cache_prior_highbit lam={lam} running", replace(base, bits=BITS["mat84"], policy=pol)))
        out.append(("baseline", "mat84 cumsum (high bit)", replace(base, bits=BITS["mat84"], policy=PolicyConfig(name="cumsum", routing="cumsum", precision="high"))))
        for b in ("mat84", "mat42"):
            for pol in (DBSC, PCW):
                out.append(("baseline", f"{b} {pol.name}", replace(base, bits=BITS[b], policy=pol)))
    return out  # fmt: skip


COLUMNS = {
    "warmup": [
        ("accuracy", "accuracy", 3),
        ("miss_rate", "miss rate (all steps)", 4),
        ("miss_rate_steady", "miss rate (steps >= 10)", 4),
        ("step0", "miss rate at step 0", 3),
        ("flash_bytes_warmup", "warmup Flash KB", 0),
        ("energy_decode_j_per_token", "decode mJ/token", 4),
        ("latency_decode_s_per_token", "decode ms/token", 4),
    ],
    "tradeoff": [
        ("accuracy", "accuracy", 3),
        ("miss_rate_hbn", "miss_rate_hbn", 3),
        ("miss_rate_refn", "miss_rate_refn", 3),
        ("highbit_fraction", "high-bit share", 3),
        ("flash_bytes_per_token", "Flash KB/token", 1),
        ("energy_decode_j_per_token", "decode mJ/token", 4),
        ("latency_decode_s_per_token", "decode ms/token", 4),
    ],
}
COLUMNS["baseline"] = COLUMNS["tradeoff"]
SCALE = {
    "energy_decode_j_per_token": 1e3,
    "latency_decode_s_per_token": 1e3,
    "flash_bytes_per_token": 1e-3,
    "flash_bytes_warmup": 1e-3,
}


def fmt(value: float, digits: int) -> str:
    return "nan" if value != value else f"{value:.{digits}f}"


def table(results: list[tuple[str, dict]], columns) -> str:
    head = ["run", *(title for _, title, _ in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results:
        r = {**r, "step0": r["curves"]["miss_rate_step"][0]}
        cells = [fmt(r[k] * SCALE.get(k, 1), d) for k, _, d in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matched(results: list[tuple[str, dict]]) -> str:
    """Each DBSC row against the cheapest high-bit Cache-Prior row at least as accurate."""
    base = [(n, r) for n, r in results if "cache_prior_highbit" in n]
    lines = ["| run | accuracy | matched baseline | its accuracy | energy/token ratio | latency/token ratio |", "|---|---|---|---|---|---|"]
    for name, r in results:
        if "dbsc" not in name:
            continue
        ok = [(n, b) for n, b in base if b["accuracy"] >= r["accuracy"]]
        if not ok:
            lines.append(f"| {name} | {r['accuracy']:.3f} | none as accurate | | | |")
            continue
        n, b = min(ok, key=lambda nb: nb[1]["energy_decode_j_per_token"])
        e = b["energy_decode_j_per_token"] / r["energy_decode_j_per_token"]
        t = b["latency_decode_s_per_token"] / r["latency_decode_s_per_token"]
        lines.append(f"| {name} | {r['accuracy']:.3f} | {n} | {b['accuracy']:.3f} | {e:.2f}x | {t:.2f}x |")
    return "\n".join(lines)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=100, help="arith problems per run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tables", default="warmup,tradeoff,baseline")
    args = parser.parse_args()
    todo = rows(args.limit, args.tables.split(","))
    with ProcessPoolExecutor(args.workers) as pool:
        done = list(pool.map(_run, [cfg for _, _, cfg in todo]))
    for name in args.tables.split(","):
        results = [(n, r) for (t, n, _), r in zip(todo, done) if t == name]
        print(f"\n### {name} ({args.limit} arith problems, cache frac 0.25)\n")
        print(table(results, COLUMNS[name]))
        if name == "baseline":
            print("\nratios: matched baseline / DBSC (> 1: DBSC is cheaper)\n")
            print(matched(results))
    assert not any(math.isnan(r["accuracy"]) for r in done)


if __name__ == "__main__":
    main()
