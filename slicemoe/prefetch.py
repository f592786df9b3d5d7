"""Expert prefetching: predict the next layer's experts and fetch them while this layer computes.

After each MoE layer l of a decode step has routed, the runtime shows the predictor what it
chose (`observe(layer, chosen)`) and asks it for the experts the next layer will use: layer
l + 1 of the same token, or layer 0 of the next token after the last layer.
`predict(layer, ranking)` returns `(experts [B, m], critical [B, m], made)` (tensors, one row per
simulated device; `made`: whether a prediction exists, a bool or a bool tensor) or None;
`ranking` is the next-gate ranking of this layer step (`NextGate.rank`). The runtime fetches
their slices (MSB, plus LSB for critical ones when `prefetch.slices=critical`;
slicemoe.device.fetch_ahead) into each device's cache and charges the transfer as
overlapping layer l (slicemoe.hardware.charge).

- next_gate: the first m of the ranking, i.e. layer l+1's router applied to the hidden state
  entering layer l's MoE block (pre-gating); critical = DBSC's rule on the predicted gate
  weights of its top-k. It has no input for the next token's layer 0, which it leaves to demand
  fetches.
- prev_token: what the next layer used for the previous token of the same sequence.
- oracle: what the next layer will use (an upper bound). It needs the future, so it runs as a
  replay of a recorded pass (slicemoe.replay), with top-k routing only: its requests must not
  depend on the cache.

A model pass that records its request stream ranks the next layer's experts and the stream
keeps the ranking (slicemoe.stream), so a replay prefetches by the same rules.
"""

from __future__ import annotations

import numpy as np
import torch

from slicemoe.config import PrefetchConfig
from slicemoe.routing import Gate, RoutingParams, choice_scores, normalised, top_indices


def pre_gate(gate: Gate, logits: torch.Tensor, bias, depth: int):
    """Pre-gating: a layer's experts ranked by its router's `logits` (and selection-only
    `bias`) on the MoE input of the layer before, the first `depth` best first [B, depth], and
    the normalised gate weights of the first k [B, k]."""
    probs = gate.probs(logits)
    idx = top_indices(choice_scores(probs, RoutingParams(bias=bias)), depth)
    return idx, normalised(gate.weights(logits, idx[:, : gate.top_k], probs))


class NextGate:
    """Ranks the next layer's experts by its own router applied to this layer's MoE input."""

    def __init__(self, gate: Gate, router_logits, layers: int, depth: int, tau: float):
        """`router_logits(layer, hidden) -> (logits [B, E], selection bias or None)`."""
        self.gate, self.router_logits, self.layers = gate, router_logits, layers
        self.depth, self.tau = depth, tau

    def rank(self, layer: int, hidden: torch.Tensor):
        """(the best `depth` experts of layer + 1, best first [B, depth], DBSC's critical flags
        of their top-k [B, k]), tensors on the model's device; None after the last layer."""
        if layer + 1 == self.layers:
            return None
        idx, scores = pre_gate(self.gate, *self.router_logits(layer + 1, hidden), self.depth)
        return idx, scores >= self.tau  # DBSC's rule (routing.critical)

    def nothing(self, rows: int, device=None):
        """What a stream records where there is no ranking: expert -1, not critical."""
        return (
            torch.full((rows, self.depth), -1, dtype=torch.int64, device=device),
            torch.zeros((rows, self.gate.top_k), dtype=torch.bool, device=device),
        )


def top_m(ranked, crit, m: int):
    """The first m experts of a ranking (last axis) and their critical flags (False past the
    top-k the flags cover); numpy arrays or tensors alike."""
    shape = ranked[..., :m].shape
    if isinstance(ranked, torch.Tensor):
        flags = torch.zeros(shape, dtype=torch.bool, device=ranked.device)
    else:
        flags = np.zeros(shape, dtype=bool)
    flags[..., : crit.shape[-1]] = crit[..., :m]
    return ranked[..., :m], flags


# The in-loop predictors keep what they learn in tensors updated in place, on the model's
# device, so that a captured decode step (slicemoe.simulator) replays them too. `predict`
# returns (experts [B, m], critical [B, m], whether a prediction exists: a bool or a bool
# tensor), or None where the predictor never predicts (next_gate after the last layer).


class PreGating:
    def __init__(self, m: int):
        self.m = m

    def start(self, rows: int, k: int, device) -> None:
        pass

    def observe(self, layer: int, chosen: torch.Tensor) -> None:
        pass

    def predict(self, layer: int, ranking):
        return None if ranking is None else (*top_m(*ranking, self.m), True)


class PrevToken:
    def __init__(self, layers: int, m: int):
        self.layers, self.m = layers, m

    def start(self, rows: int, k: int, device) -> None:
        # per layer, the experts of its latest token [B, k], and whether it has seen one
        self.last = torch.zeros((self.layers, rows, k), dtype=torch.int64, device=device)
        self.seen = torch.zeros(self.layers, dtype=torch.bool, device=device)

    def observe(self, layer: int, chosen: torch.Tensor) -> None:
        self.last[layer].copy_(chosen)
        self.seen[layer].fill_(True)  # a fill kernel, no copy from the host

    def predict(self, layer: int, ranking):
        # The next layer's latest token is the previous one (this one, for the next layer 0).
        nxt = (layer + 1) % self.layers
        prev = self.last[nxt, :, : self.m]
        return prev, torch.zeros_like(prev, dtype=torch.bool), self.seen[nxt]


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
