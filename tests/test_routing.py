import pytest
import torch

from slicemoe.routing import Gate, RoutingParams, _select, critical, precision, route

E, K = 16, 4


def logits_and_cache(seed=0, b=64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, E, generator=g) * 2
    cached = torch.rand(b, E, generator=g) < 0.4
    return logits, cached


@pytest.mark.parametrize("scoring,norm", [("softmax", False), ("softmax", True), ("sigmoid", True)])
def test_topk_is_the_models_own_rule(scoring, norm):
    gate = Gate(K, scoring, norm, scale=2.0)
    logits, cached = logits_and_cache()
    idx, w = route("topk", gate, logits, cached, RoutingParams())
    probs = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    ref_w, ref_idx = probs.topk(K, -1)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    if norm:
        ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    assert torch.allclose(w.sort(-1).values, (2.0 * ref_w).sort(-1).values)


@pytest.mark.parametrize(
    "gate,bias",
    [
        (Gate(K), None),
        (Gate(K, "sigmoid", True, scale=2.5), torch.linspace(-0.3, 0.3, E)),
        (Gate(K, n_group=4, topk_group=2, group_score="top2"), None),
    ],
)
def test_topk_without_priorities_selects_as_with_equal_ones(gate, bias):
    """topk skips the priority key (a kernel each a layer on the GPU): the same experts and
    weights, bit for bit, as ranking by equal priorities spread apart by the scores' range."""
    logits, _ = logits_and_cache(3)
    p = RoutingParams(bias=bias)
    probs = gate.probs(logits)
    plain = _select(gate, logits, probs, torch.zeros(logits.shape, dtype=torch.long), p)
    fast = _select(gate, logits, probs, None, p)
    assert torch.equal(plain[0], fast[0]) and torch.equal(plain[1], fast[1])


def test_cache_prior_with_zero_lambda_equals_topk():
    gate = Gate(K)
    logits, cached = logits_and_cache(1)
    a = route("topk", gate, logits, cached, RoutingParams())
    b = route("cache_prior", gate, logits, cached, RoutingParams(lam=0.0))
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_cache_prior_scales_lambda_by_the_given_logit_range():
    """A given range (lam_scale=running) equal to each token's own range routes like `token`;
    a range 0 removes the prior."""
    gate = Gate(K)
    logits, cached = logits_and_cache(3, b=64)
    own = (logits.amax(-1) - logits.amin(-1)).unsqueeze(-1)
    token = route("cache_prior", gate, logits, cached, RoutingParams(lam=0.3))
    given = route("cache_prior", gate, logits, cached, RoutingParams(lam=0.3, spread=own))
    assert torch.equal(token[0], given[0])
    zero = RoutingParams(lam=0.3, spread=torch.zeros_like(own))
    top = route("topk", gate, logits, cached, RoutingParams())
    assert torch.equal(route("cache_prior", gate, logits, cached, zero)[0], top[0])
    assert not torch.equal(token[0], top[0])


def test_cache_prior_with_large_lambda_picks_only_cached_experts_when_k_are_cached():
    gate = Gate(K)
    logits, cached = logits_and_cache(2, b=256)
    idx, w = route("cache_prior", gate, logits, cached, RoutingParams(lam=10.0))
    picked_cached = cached.gather(-1, idx)
    enough = cached.sum(-1) >= K
    assert enough.any() and (~enough).any()
    assert picked_cached[enough].all()
    # Rows with fewer than k cached experts take all of them.
    assert torch.equal(picked_cached[~enough].sum(-1), cached[~enough].sum(-1))
    # Gate weights come from the original probabilities of the chosen experts.
    assert torch.allclose(w, logits.softmax(-1).gather(-1, idx))


def test_cumsum_prefers_cached_candidates_within_the_mass_threshold():
    gate = Gate(2)
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.05, 0.05]]))
    cached = torch.tensor([[False, False, True, True, False]])
    # Candidates reach 0.9 mass: experts 0, 1, 2. Cached candidate 2 first, then rank: 0.
    idx, _ = route("cumsum", gate, logits, cached, RoutingParams(cumsum_p=0.9))
    assert sorted(idx[0].tolist()) == [0, 2]
    # Expert 3 is cached but outside the candidate set, so a tighter p keeps rank order.
    idx, _ = route("cumsum", gate, logits, cached, RoutingParams(cumsum_p=0.5))
    assert sorted(idx[0].tolist()) == [0, 1]


def test_max_rank_keeps_top_j_and_fills_from_cached_within_m():
    gate = Gate(3)
    logits = torch.log(torch.tensor([[0.3, 0.25, 0.2, 0.1, 0.08, 0.07]]))
    cached = torch.tensor([[False, False, False, True, False, True]])
    idx, _ = route("max_rank", gate, logits, cached, RoutingParams(max_rank_keep=1, max_rank_m=5))
    # Expert 0 kept; cached 3 (rank 3 < 5) fills; cached 5 is rank 5, outside M -> rank order: 1.
    assert sorted(idx[0].tolist()) == [0, 1, 3]


def test_group_limited_routing_stays_in_the_best_groups():
    gate = Gate(2, n_group=4, topk_group=1)
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0, 4.9, 0.0, 0.0]])
    idx, _ = route("topk", gate, logits, torch.zeros(1, 8, dtype=torch.bool), RoutingParams())
    assert sorted(idx[0].tolist()) == [4, 5]
    gate = Gate(2, n_group=4, topk_group=1)
    logits = torch.tensor([[0.0, 0.0, 3.0, 0.0, 5.0, 0.0, 0.0, 0.0]])
    idx, _ = route("topk", gate, logits, torch.zeros(1, 8, dtype=torch.bool), RoutingParams())
    assert 2 not in idx[0].tolist()


def test_dbsc_tau_extremes_and_token_adaptive_count():
    w = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]])
    assert precision("dbsc", w, 0.0).all()
    assert not precision("dbsc", w, 1.01).any()
    assert critical(w, 0.5).sum(-1).tolist() == [1, 0]
    assert critical(w, 0.25).sum(-1).tolist() == [1, 2]
    assert precision("high", w, 0.5).all() and not precision("low", w, 0.5).any()


def test_unknown_policy_names_the_field():
    with pytest.raises(ValueError, match="policy.routing"):
        route("nope", Gate(K), torch.zeros(1, E), torch.zeros(1, E), RoutingParams())
    with pytest.raises(ValueError, match="policy.precision"):
        precision("mid", torch.ones(1, 2), 0.5)


def test_the_runtime_passes_every_policy_knob_to_routing():
    """Each routing parameter reaches the rule under its own name (a positional mix-up once
    fed cumsum_p to Cache-Prior's logit range)."""
    from slicemoe.config import BitsConfig, HardwareConfig, PolicyConfig
    from slicemoe.device import footprint
    from slicemoe.models import Dims, Shape
    from slicemoe.runtime import Runtime

    policy = PolicyConfig(lam=0.3, cumsum_p=0.7, max_rank_keep=2, max_rank_m=5)
    fp = footprint(Dims(1, 1, 1, 1), Shape(1, 8, 2, 4, 4), BitsConfig(), HardwareConfig())
    p = Runtime(Gate(2), fp, policy, HardwareConfig()).params
    assert (p.lam, p.cumsum_p, p.max_rank_keep, p.max_rank_m, p.spread) == (0.3, 0.7, 2, 5, None)
