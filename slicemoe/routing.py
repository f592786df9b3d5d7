"""Cache-aware expert selection and DBSC precision (DESIGN.md section 4).

Every policy takes router logits for a batch of tokens `[B, E]` (one row per token, each row
possibly on its own device/cache) and the cache state `cached[B, E]` (an MSB or FULL slice of
that expert is in DRAM for that row), and returns `(idx[B, k], weights[B, k])`. The weights are
always the model's own gate weights of the chosen experts (its scoring, top-k normalisation and
scaling), so a policy changes *which* experts run, never how their outputs are mixed.

The cache-aware rules follow Skliar et al., "Mixture of Cache-Conditional Experts" (TMLR 2025).
All of them are written as "rank by a priority, break ties by probability" so that one `topk`
call selects for the whole batch at once:
- cache_prior: logits + lam * (max - min logit) on cached experts, then the model's top-k; the
  range is the token's own or a running mean over past tokens (`RoutingParams.spread`).
- cumsum: candidates = the smallest prefix (by probability) whose mass reaches p, at least k of
  them; cached candidates first, then the remaining candidates by rank.
- max_rank: the top-J always run; the other k-J slots go to cached experts ranked within the
  top M, falling back to rank order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Gate:
    """How a model turns router logits into gate weights."""

    top_k: int
    scoring: str = "softmax"  # softmax | sigmoid | sparsemixer (Phi-3.5-MoE)
    norm_topk: bool = False  # renormalise the k chosen weights to sum to 1 ...
    norm_eps: float = 0.0  # ... dividing by their sum + norm_eps (LFM2-MoE: 1e-6) ...
    norm_min: float = 1e-20  # ... clamped below at norm_min (ERNIE-4.5: moe_norm_min)
    scale: float = 1.0  # DeepSeek's routed_scaling_factor
    jitter_eps: float = 0.0  # sparsemixer's relative logit threshold
    n_group: int = 1  # DeepSeek group-limited greedy: experts split into n_group groups ...
    topk_group: int = 1  # ... and only the best topk_group groups may be chosen from
    # A group's score: its best expert (DeepSeek-V2) or the sum of its best two (DeepSeek-V3).
    group_score: str = "max"  # max | top2

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The scores experts are ranked by (and cumsum's probability mass)."""
        logits = logits.float()
        return logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(-1)

    def allowed(self, choice: torch.Tensor) -> torch.Tensor | None:
        """Mask of experts in the selected groups (None when routing is not group limited)."""
        if self.n_group <= 1 or self.topk_group >= self.n_group:
            return None
        b, e = choice.shape
        grouped = choice.view(b, self.n_group, -1)
        if self.group_score == "top2":
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            group_score = grouped.amax(-1)
        top = group_score.topk(self.topk_group, dim=-1).indices
        gmask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, top, True)
        return gmask.repeat_interleave(e // self.n_group, dim=1)

    def weights(self, logits: torch.Tensor, idx: torch.Tensor, probs=None) -> torch.Tensor:
        """The model's own gate weights of the chosen experts `idx`, whoever chose them;
        `probs`: `self.probs(logits)` where the caller has it already."""
        if self.scoring == "sparsemixer":
            return self._sparsemixer(logits.float(), idx)
        w = (self.probs(logits) if probs is None else probs).gather(-1, idx)
        if self.norm_topk:
            w = w / (w.sum(-1, keepdim=True) + self.norm_eps).clamp_min(self.norm_min)
        # Skipped at 1 (exact either way): a decode step runs this once a layer, a kernel each.
        return w if self.scale == 1.0 else w * self.scale

    def _sparsemixer(self, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # Phi-3.5-MoE weighs its i-th expert by a softmax over the experts not chosen before it
        # whose logits lie within a relative 2 * jitter_eps of that expert's own logit. With top-k
        # choice that logit is the remaining maximum, as in the model; any other choice is
        # weighed the same way, in the order of its logits.
        order = logits.gather(-1, idx).argsort(-1, descending=True)
        factor = logits.abs()
        earlier = torch.zeros_like(logits, dtype=torch.bool)
        w = torch.empty(idx.shape, dtype=logits.dtype, device=logits.device)
        for i in range(idx.shape[-1]):
            pos = order[:, i : i + 1]
            c = idx.gather(-1, pos)
            m = logits.gather(-1, c)
            far = (m - logits) / factor.clamp(min=m) > 2 * self.jitter_eps
            masked = logits.masked_fill(far | earlier, float("-inf"))
            w.scatter_(-1, pos, masked.softmax(-1).gather(-1, c))
            earlier.scatter_(-1, c, True)
        return w


@dataclass(frozen=True)
class RoutingParams:
    lam: float | torch.Tensor = 0.0  # a [B, 1] tensor gives each row its own strength
    cumsum_p: float = 0.9
    max_rank_keep: int = 1
    max_rank_m: int = 8
    # The logit range lam multiplies, [B, 1]; None = each token's own max - min logit.
    spread: torch.Tensor | None = None
    # DeepSeek-V3's score-correction bias, [E]: added to the scores to *choose* experts, never
    # to weight them. None for families without one.
    bias: torch.Tensor | None = None


def choice_scores(probs: torch.Tensor, p: RoutingParams) -> torch.Tensor:
    """What experts are chosen by: the scores, plus the selection-only bias where one exists."""
    return probs if p.bias is None else probs + p.bias.float()


def top_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest of each row, best first: on CUDA one kernel
    (slicemoe.kernels.topk, equal scores by the lower index), elsewhere torch.topk."""
    if x.is_cuda:
        from slicemoe.kernels.topk import topk_indices

        return topk_indices(x, k)
    return x.topk(k, dim=-1).indices


def _select(gate: Gate, logits, probs: torch.Tensor, priority, p: RoutingParams):
    """The top-k by `priority` [B, E] (None: all equal), ties broken by the choice scores."""
    key = choice = choice_scores(probs, p)
    if priority is not None:
        # Priorities are small integers; a step wider than the choice scores' range keeps them
        # apart, and the scores break ties by rank.
        span = choice.amax(-1, keepdim=True) - choice.amin(-1, keepdim=True) + 1.0
        key = priority.float() * span + choice
    allowed = gate.allowed(choice)
    if allowed is not None:
        key = key.masked_fill(~allowed, float("-inf"))
    idx = top_indices(key, gate.top_k)
    return idx, gate.weights(logits, idx, probs)


def _ranks(probs: torch.Tensor) -> torch.Tensor:
    order = probs.argsort(-1, descending=True)
    return torch.empty_like(order).scatter_(
        -1, order, torch.arange(probs.shape[-1], device=probs.device).expand_as(order)
    )


def topk(gate: Gate, logits, cached, p: RoutingParams):
    return _select(gate, logits, gate.probs(logits), None, p)


def cache_prior(gate: Gate, logits, cached, p: RoutingParams):
    logits = logits.float()
    spread = p.spread
    if spread is None:
        spread = logits.amax(-1, keepdim=True) - logits.amin(-1, keepdim=True)
    boosted = choice_scores(gate.probs(logits + p.lam * spread * cached.float()), p)
    allowed = gate.allowed(boosted)
    if allowed is not None:
        boosted = boosted.masked_fill(~allowed, float("-inf"))
    idx = top_indices(boosted, gate.top_k)
    return idx, gate.weights(logits, idx)


def cumsum(gate: Gate, logits, cached, p: RoutingParams):
    probs = gate.probs(logits)
    sorted_p, order = probs.sort(-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    cand_sorted = (mass_before < p.cumsum_p * sorted_p.sum(-1, keepdim=True)) | (
        torch.arange(probs.shape[-1], device=probs.device) < gate.top_k
    )
    cand = torch.zeros_like(cand_sorted).scatter_(-1, order, cand_sorted)
    priority = cand.long() + (cand & cached).long()
    return _select(gate, logits, probs, priority, p)


def max_rank(gate: Gate, logits, cached, p: RoutingParams):
    probs = gate.probs(logits)
    rank = _ranks(choice_scores(probs, p))
    keep = rank < p.max_rank_keep
    fill = cached & (rank < p.max_rank_m)
    return _select(gate, logits, probs, 2 * keep.long() + fill.long(), p)


ROUTING: dict[str, Callable] = {
    "topk": topk,
    "cache_prior": cache_prior,
    "cumsum": cumsum,
    "max_rank": max_rank,
}


def route(name: str, gate: Gate, logits, cached, params: RoutingParams):
    if name not in ROUTING:
        raise ValueError(f"policy.routing={name!r} is unknown; choose one of {sorted(ROUTING)}")
    cached = torch.as_tensor(cached, dtype=torch.bool).to(logits.device)
    return ROUTING[name](gate, logits, cached, params)


def normalised(weights: torch.Tensor) -> torch.Tensor:
    """Gate weights normalised over the chosen experts of their token (they sum to 1): what
    DBSC's tau is compared with, and a trace's gate scores."""
    return weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)


def critical(weights: torch.Tensor, tau: float) -> torch.Tensor:
    """DBSC: an expert is critical (runs high-bit) when its gate weight, normalised over the
    chosen experts of its token, is >= tau. tau=0 -> all high-bit; tau>1 -> all low-bit."""
    return normalised(weights) >= tau


def droppable(weights: torch.Tensor, below: float) -> torch.Tensor:
    """policy.on_miss=drop: the chosen experts left out should they miss, those whose gate
    weight normalised over the chosen experts of their token is below `below`; never a token's
    highest-scoring expert (the first of equals), so that every token computes one."""
    norm = normalised(weights)
    top = torch.zeros_like(norm, dtype=torch.bool).scatter_(-1, norm.argmax(-1, keepdim=True), True)
    return (norm < below) & ~top


def without(weights: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """The gate weights of a token's experts once the `dropped` ones are left out: the rest
    scaled back to the sum all of them had. Tokens that dropped none keep theirs as they are."""
    kept = weights.masked_fill(dropped, 0.0)
    scaled = kept * (weights.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True))
    return torch.where(dropped.any(-1, keepdim=True), scaled, weights)


def precision(mode: str, weights: torch.Tensor, tau: float) -> torch.Tensor:
    """Which chosen experts request the high-bit path: policy.precision high | low | dbsc."""
    if mode == "high":
        return torch.ones_like(weights, dtype=torch.bool)
    if mode == "low":
        return torch.zeros_like(weights, dtype=torch.bool)
    if mode == "dbsc":
        return critical(weights, tau)
    raise ValueError(f"policy.precision={mode!r} is unknown; choose high, low or dbsc")
