"""Expert prefetching: predict the next layer's experts and fetch them while this layer computes.

After each MoE layer l of a decode step has routed, the runtime shows the predictor what it
chose (`observe(layer, step, chosen)`) and asks it for the experts the next layer will use: layer
l + 1 of the same token, or layer 0 of the next token after the last layer.
`predict(layer, step, ranking)` returns `(experts [B, m], critical [B, m])` or None, one row per
simulated device; `ranking` is the next-gate ranking of this layer step (`NextGate.rank`). The
runtime fetches their slices (MSB, plus LSB for critical ones when `prefetch.slices=critical`;
slicemoe.models.adapter.fetch_ahead) into each device's cache and charges the transfer as
overlapping layer l (slicemoe.hardware.charge).

- next_gate: the first m of the ranking, i.e. layer l+1's router applied to the hidden state
  entering layer l's MoE block (pre-gating); critical = DBSC's rule on the predicted gate
  weights of its top-k. It has no input for the next token's layer 0, which it leaves to demand
  fetches.
- prev_token: what the next layer used for the previous token of the same sequence.
- oracle: what the next layer will use (an upper bound). It needs the future, so it runs as a
  replay of a recorded pass (slicemoe.replay), with top-k routing only: its requests must not
  depend on the cache.

Every model pass ranks the next layer's experts and the request stream records the ranking
(slicemoe.stream), so a replay prefetches by the same rules.
"""

from __future__ import annotations

import numpy as np
import torch

from slicemoe.config import PrefetchConfig
from slicemoe.routing import Gate, RoutingParams, choice_scores, critical


class NextGate:
    """Ranks the next layer's experts by its own router applied to this layer's MoE input."""

    def __init__(self, gate: Gate, router_logits, layers: int, depth: int, tau: float):
        """`router_logits(layer, hidden) -> (logits [B, E], selection bias or None)`."""
        self.gate, self.router_logits, self.layers = gate, router_logits, layers
        self.depth, self.tau = depth, tau

    def rank(self, layer: int, hidden: torch.Tensor):
        """(the best `depth` experts of layer + 1, best first [B, depth], DBSC's critical flags
        of their top-k [B, k]); None after the last layer."""
        if layer + 1 == self.layers:
            return None
        logits, bias = self.router_logits(layer + 1, hidden)
        choice = choice_scores(self.gate.probs(logits), RoutingParams(bias=bias))
        idx = choice.topk(self.depth, dim=-1).indices
        crit = critical(self.gate.weights(logits, idx[:, : self.gate.top_k]), self.tau)
        return idx.cpu().numpy(), crit.cpu().numpy()

    def nothing(self, rows: int):
        """What a stream records where there is no ranking: expert -1, not critical."""
        return np.full((rows, self.depth), -1), np.zeros((rows, self.gate.top_k), dtype=bool)


def top_m(ranked: np.ndarray, crit: np.ndarray, m: int):
    """The first m experts of a ranking (last axis) and their critical flags (False past the
    top-k the flags cover)."""
    flags = np.zeros(ranked[..., :m].shape, dtype=bool)
    flags[..., : crit.shape[-1]] = crit[..., :m]
    return ranked[..., :m], flags


class PreGating:
    def __init__(self, m: int):
        self.m = m

    def start(self) -> None:
        pass

    def observe(self, layer: int, step: int, chosen: np.ndarray) -> None:
        pass

    def predict(self, layer: int, step: int, ranking):
        return None if ranking is None else top_m(*ranking, self.m)


class PrevToken:
    def __init__(self, layers: int, m: int):
        self.layers, self.m = layers, m
        self.last: dict[int, np.ndarray] = {}  # layer -> [B, k] experts of its latest token

    def start(self) -> None:
        self.last = {}

    def observe(self, layer: int, step: int, chosen: np.ndarray) -> None:
        self.last[layer] = chosen

    def predict(self, layer: int, step: int, ranking):
        # The next layer's latest token is the previous one (this one, for the next layer 0).
        prev = self.last.get((layer + 1) % self.layers)
        if prev is None:
            return None
        return prev[:, : self.m], np.zeros(prev[:, : self.m].shape, dtype=bool)


PREDICTORS = ("none", "next_gate", "prev_token", "oracle")


def make_predictor(cfg: PrefetchConfig, k: int, layers: int):
    """The in-loop predictor `cfg.predictor` names, or None for `none`."""
    m = cfg.top_m or k
    if cfg.predictor == "none":
        return None
    if cfg.predictor == "next_gate":
        return PreGating(m)
    if cfg.predictor == "prev_token":
        return PrevToken(layers, m)
    if cfg.predictor == "oracle":
        raise ValueError("prefetch=oracle runs as a replay of a recorded pass (slicemoe.run.run)")
    raise ValueError(f"prefetch.predictor={cfg.predictor!r} is unknown; use one of {PREDICTORS}")
