"""Expert prefetching: predict the next layer's experts and fetch them while this layer computes.

After each MoE layer l of a decode step has routed, the runtime shows the predictor what it
chose (`observe(layer, step, chosen)`) and asks it for the experts the next layer will use: layer
l + 1 of the same token, or layer 0 of the next token after the last layer.
`predict(layer, step, hidden)` returns `(experts [B, m], critical [B, m])` or None, one row per
simulated device. The runtime fetches their slices (MSB, plus LSB for critical ones when
`prefetch.slices=critical`) into each device's cache and charges the transfer as overlapping
layer l (slicemoe.hardware.charge).

- next_gate: layer l+1's router applied to the hidden state entering layer l's MoE block
  (pre-gating); critical = DBSC's rule on the predicted gate weights of its top-k. It has no
  input for the next token's layer 0, which it leaves to demand fetches.
- prev_token: what the next layer used for the previous token of the same sequence.
- oracle: what the next layer will use (an upper bound). It needs the future, so it runs as a
  replay of a recorded pass (slicemoe.replay), with top-k routing only: its requests must not
  depend on the cache.

A replay prefetches by the same rules from the request stream, which records the next_gate
ranking of every layer step (slicemoe.stream).
"""

from __future__ import annotations

import numpy as np
import torch

from slicemoe.config import PrefetchConfig
from slicemoe.routing import Gate, critical


def fetch(cache, layer: int, experts, crit, kinds, cold: bool) -> int:
    """Prefetch the slices of `experts` of `layer` into `cache` (`kinds(crit)`: the slices
    of one expert); the Flash bytes moved. MSB slices go first: an LSB fetched before them
    would be the first thing their room is made from (the LSB pool is emptied first)."""
    slices = [(int(e), kind) for e, c in zip(experts, crit) for kind in kinds(bool(c))]
    return sum(
        cache.prefetch((layer, e, kind), cold)
        for e, kind in sorted(slices, key=lambda s: s[1] == "LSB")
    )


class NextGate:
    def __init__(self, gate: Gate, router_logits, layers: int, m: int, tau: float):
        """`router_logits(layer, hidden) -> (logits [B, E], selection bias or None)`."""
        self.gate, self.router_logits, self.m, self.tau = gate, router_logits, m, tau
        self.layers = layers

    def start(self) -> None:
        pass

    def observe(self, layer: int, step: int, chosen: np.ndarray) -> None:
        pass

    def predict(self, layer: int, step: int, hidden: torch.Tensor):
        if layer + 1 == self.layers:
            return None
        logits, bias = self.router_logits(layer + 1, hidden)
        choice = self.gate.probs(logits)
        if bias is not None:
            choice = choice + bias.float()
        idx = choice.topk(self.m, dim=-1).indices
        k = self.gate.top_k
        crit = torch.zeros(idx.shape, dtype=torch.bool)
        crit[:, :k] = critical(self.gate.weights(logits, idx[:, :k]), self.tau).cpu()
        return idx.cpu().numpy(), crit.numpy()


class PrevToken:
    def __init__(self, layers: int, m: int):
        self.layers, self.m = layers, m
        self.last: dict[int, np.ndarray] = {}  # layer -> [B, k] experts of its latest token

    def start(self) -> None:
        self.last = {}

    def observe(self, layer: int, step: int, chosen: np.ndarray) -> None:
        self.last[layer] = chosen

    def predict(self, layer: int, step: int, hidden):
        # The next layer's latest token is the previous one (this one, for the next layer 0).
        prev = self.last.get((layer + 1) % self.layers)
        if prev is None:
            return None
        return prev[:, : self.m], np.zeros(prev[:, : self.m].shape, dtype=bool)


PREDICTORS = ("none", "next_gate", "prev_token", "oracle")


def make_predictor(cfg: PrefetchConfig, gate: Gate, layers: int, tau: float, router_logits):
    """The in-loop predictor `cfg.predictor` names, or None for `none`."""
    m = cfg.top_m or gate.top_k
    if cfg.predictor == "none":
        return None
    if cfg.predictor == "next_gate":
        return NextGate(gate, router_logits, layers, m, tau)
    if cfg.predictor == "prev_token":
        return PrevToken(layers, m)
    if cfg.predictor == "oracle":
        raise ValueError("prefetch=oracle runs as a replay of a recorded pass (slicemoe.run.run)")
    raise ValueError(f"prefetch.predictor={cfg.predictor!r} is unknown; use one of {PREDICTORS}")
