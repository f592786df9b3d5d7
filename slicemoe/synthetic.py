"""Synthetic traces for what-if studies, and the fit of their parameters from a stream.

The workload model, per MoE layer: experts are popular by a Zipf law (the expert of rank r,
in a random order per layer, is drawn with weight r^-zipf), and each of a token's k choices
reuses one of the previous token's experts at that layer with probability `reuse`, else is a
fresh draw by popularity (without replacement within the token). Gate scores are a symmetric
Dirichlet(`alpha`) over the k chosen, the largest first. Prompts are `prompt_len` tokens routed
by the same popularity. Nothing else of a real router is modelled: no correlation across
layers, no drift of popularity within a sequence, no next-gate ranking (a synthetic trace
refuses next-gate prefetching). `fit(stream)` estimates zipf and reuse from any stream, so a
tiny-model or imported stream can be scaled to a larger model's shape.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from slicemoe.models import Shape
from slicemoe.stream import Stream
from slicemoe.traces import write


@dataclasses.dataclass(frozen=True)
class Workload:
    zipf: float = 1.0  # popularity exponent per layer (0: uniform)
    reuse: float = 0.3  # probability that a choice reuses one of the previous token's experts
    prompt_len: int = 64
    alpha: float = 1.0  # Dirichlet concentration of the gate scores over the k chosen


def _top_k(keys: np.ndarray, k: int) -> np.ndarray:
    """The indices of the k largest keys on the last axis, largest first."""
    top = np.argpartition(-keys, k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(keys, top, -1), axis=-1)
    return np.take_along_axis(top, order, -1)


def synthesize(
    shape: Shape, w: Workload, sequences: int, steps: int, out: str | Path, seed: int = 0
) -> Path:
    """Write a trace of `sequences` x `steps` decode steps at `shape` (slicemoe.traces)."""
    rng = np.random.default_rng(seed)
    layers, num, k = shape.num_moe_layers, shape.num_experts, shape.top_k
    # Per layer, the Zipf weight of each expert (its rank in a random order).
    ranks = np.argsort(rng.random((layers, num)), axis=1) + 1
    log_p = -w.zipf * np.log(ranks)
    # Sampling without replacement by weight: the top k of log weight + Gumbel noise.
    prefill = np.zeros((sequences, layers, num), np.int32)
    for _ in range(w.prompt_len):
        chosen = _top_k(log_p + rng.gumbel(size=(sequences, layers, num)), k)
        np.put_along_axis(prefill, chosen, np.take_along_axis(prefill, chosen, -1) + 1, -1)
    experts = np.zeros((steps, sequences, layers, k), np.int64)
    prev = None
    for t in range(steps):
        keys = log_p + rng.gumbel(size=(sequences, layers, num))
        if prev is not None:  # each previous expert kept with probability `reuse`; one not
            # kept may still be drawn fresh, by its popularity
            kept = rng.random(prev.shape) < w.reuse
            np.put_along_axis(
                keys, prev, np.where(kept, np.inf, np.take_along_axis(keys, prev, -1)), -1
            )
        experts[t] = prev = _top_k(keys, k)
    scores = -np.sort(-rng.dirichlet(np.full(k, w.alpha), (sequences * steps, layers)), axis=-1)
    arrays = {
        "prompt_len": np.full(sequences, w.prompt_len),
        "decode_steps": np.full(sequences, steps),
        # Sequence after sequence, step-major.
        "experts": experts.transpose(1, 0, 2, 3).reshape(sequences * steps, layers, k),
        "prefill_counts": prefill,
        "gate_scores": scores,
    }
    return write(
        out,
        arrays,
        source="slicemoe.synthetic",
        synthetic={**dataclasses.asdict(w), "seed": seed, "shape": dataclasses.asdict(shape)},
    )


def fit(stream: Stream, seed: int = 0) -> Workload:
    """The workload parameters of a stream: zipf from the decode popularity per layer (the
    slope of log count against log rank, averaged over layers), reuse from the overlap of
    consecutive tokens' experts beyond the overlap of two tokens drawn at random."""
    layers, num = stream.shape.num_moe_layers, stream.shape.num_experts
    ex = stream.experts.astype(np.int64)
    slopes = []
    for layer in range(layers):
        counts = np.sort(np.bincount(ex[:, layer].ravel(), minlength=num))[::-1]
        used = counts > 0
        if used.sum() >= 2:
            rank = np.log(np.arange(1, num + 1)[used])
            slopes.append(-np.polyfit(rank, np.log(counts[used]), 1)[0])

    def overlap(a, b):  # mean share of a token's experts also in the other token's set
        return float((a[..., :, None] == b[..., None, :]).any(-1).mean())

    starts = np.concatenate([[0], np.cumsum(stream.decode_steps)])[:-1]
    follows = np.ones(len(ex), bool)
    follows[starts] = False  # a sequence's first step has no previous token
    after = np.nonzero(follows)[0]
    seen = overlap(ex[after], ex[after - 1])
    chance = overlap(ex[after], ex[np.random.default_rng(seed).permutation(after) - 1])
    reuse = max(0.0, (seen - chance) / (1 - chance)) if chance < 1 else 0.0
    return Workload(
        zipf=float(np.mean(slopes)) if slopes else 0.0,
        reuse=reuse,
        prompt_len=int(round(float(np.mean(stream.prompt_len)))),
    )
