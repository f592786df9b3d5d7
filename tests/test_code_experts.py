"""Experts held once as codes (slicemoe.models.code_experts) compute what the two dequantized
copies compute, on both paths and every scheme; the CUDA kernel (slicemoe.kernels.expert_gemm)
computes what the reference computes (on CUDA, or on the CPU through Triton's interpreter)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from slicemoe.config import BitsConfig
from slicemoe.models import moe_blocks
from slicemoe.models.adapter import quantize_model
from slicemoe.models.code_experts import CodeExperts

BITS = {
    "mat84": BitsConfig(),
    "mat63 trunc": BitsConfig(high=6, low=3, scheme="trunc"),
    "mat42 base": BitsConfig(high=4, low=2, scheme="base"),
    "mat84 sym": BitsConfig(symmetric=True),
    "int8": BitsConfig(high=8, low=None),
}


def model():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_experts=6, num_experts_per_tok=2,
    )  # fmt: skip
    return Qwen2MoeForCausalLM(config).eval()


def inputs(tokens, k, experts, g):
    hidden = torch.randn(tokens, 64, generator=g)
    idx = torch.stack([torch.randperm(2 * experts, generator=g)[:k] for _ in range(tokens)])
    return hidden, idx, torch.rand(tokens, k, generator=g)


@pytest.mark.parametrize("name", sorted(BITS))
def test_codes_compute_what_the_dequantized_copies_compute(name):
    bits = BITS[name]
    dense, coded = model(), model()
    quantize_model(dense, bits)
    quantize_model(coded, bits, codes=True)
    g = torch.Generator().manual_seed(1)
    for ref, ours in zip(moe_blocks(dense), moe_blocks(coded)):
        assert isinstance(ours.experts, CodeExperts)
        assert not list(ours.experts.parameters())  # no float copy of the weights is kept
        hidden, idx, w = inputs(9, 2, 6, g)
        if bits.low is None:
            idx = idx % 6  # a single precision has only the high path
        want = ref.experts(hidden, idx, w)
        got = ours.experts(hidden, idx, w)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), name
    # The non-expert weights and the dims the hardware model reads are the same either way.
    from slicemoe.models import model_dims

    assert model_dims(dense) == model_dims(coded)


def test_one_copy_of_codes_is_the_smallest_store():
    """MAT84 codes: one byte per weight plus group metadata, about a quarter of two fp32
    copies; bits.scheme=base keeps a second copy of codes."""
    ex = moe_blocks(model())[0].experts
    weights = ex.gate_up_proj.numel() + ex.down_proj.numel()
    for bits, copies in ((BitsConfig(), 1), (BitsConfig(high=4, low=2, scheme="base"), 2)):
        coded = CodeExperts(copy.deepcopy(ex), bits, silu=True)
        codes = sum(b.numel() for n, b in coded.named_buffers() if n.endswith("_q"))
        assert codes == copies * weights


needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed (CPU installs)"
)


@needs_triton
@pytest.mark.parametrize("name", sorted(BITS))
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_the_kernel_computes_what_the_reference_computes(name, tokens):
    from slicemoe.kernels.expert_gemm import code_experts

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bits = BITS[name]
    m = model()
    quantize_model(m, bits, codes=True)
    ex = moe_blocks(m)[0].experts.to(device)
    g = torch.Generator().manual_seed(tokens)
    hidden, idx, w = (t.to(device) for t in inputs(tokens, 2, 6, g))
    if bits.low is None:
        idx = idx % 6
    want = ex.reference(hidden, idx, w)
    got = code_experts(ex, hidden, idx, w)
    err = (got - want).norm() / want.norm()
    # float32 on the CPU; on CUDA the float32 products run as TF32
    assert err < (1e-5 if device == "cpu" else 3e-3), float(err)


@needs_triton
@pytest.mark.parametrize("name", sorted(BITS))
def test_the_kernels_dequantize_every_weight_exactly_as_the_reference(name):
    """Bit for bit, both paths: the kernels' codes become floats through their bits, and the
    low path keeps its codes' bits in place with its zero-point taken 2^shift times."""
    from slicemoe.kernels import expert_gemm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = model().to(torch.bfloat16 if device == "cuda" else torch.float32)
    quantize_model(m, BITS[name], codes=True)
    ex = moe_blocks(m)[0].experts.to(device)
    virtual = 2 * ex.num_experts
    used = torch.ones(virtual, dtype=torch.int64, device=device)
    for proj in ("gate_up_proj", "down_proj"):
        got = expert_gemm.dequantize(ex, proj, used, expert_gemm.low_path(ex), 0, virtual)
        for v in range(virtual):
            assert torch.equal(got[v], ex.weight(proj, v)), (proj, v)


def sorted_rows(v: torch.Tensor, num_virtual: int, bm: int):
    """`align`'s rows the plain way: the pairs in a stable sort by virtual expert, each
    expert's run padded to whole blocks of bm with the out-of-range index."""
    order = torch.argsort(v, stable=True).tolist()
    ids, blocks = [], []
    for e in range(num_virtual):
        run = [i for i in order if v[i] == e]
        run += [len(v)] * (-len(run) % bm)
        ids += run
        blocks += [e] * (len(run) // bm)
    return ids, blocks


@needs_triton
@pytest.mark.parametrize(
    "pairs,num_virtual,bm",
    [(0, 8, 16), (1, 8, 16), (37, 6, 4), (512, 120, 16), (1000, 120, 64), (2500, 30, 16)],
)
def test_align_groups_the_pairs_as_a_stable_sort_does(pairs, num_virtual, bm):
    """`align` (plain tensor ops) as a stable sort; its kernel (`aligned`) as `align`."""
    from slicemoe.kernels.expert_gemm import align, aligned

    v = torch.randint(0, num_virtual, (pairs,), generator=torch.Generator().manual_seed(pairs))
    ids, blocks = align(v, num_virtual, bm)
    fast = aligned(v.to("cuda" if torch.cuda.is_available() else "cpu"), num_virtual, bm)
    assert torch.equal(fast[0].cpu(), ids) and torch.equal(fast[1].cpu(), blocks)
    want_ids, want_blocks = sorted_rows(v, num_virtual, bm)
    # then whole blocks of padding, of no expert, up to the size the captured step reserves
    assert ids[: len(want_ids)].tolist() == want_ids and (ids[len(want_ids) :] == pairs).all()
    assert blocks[: len(want_blocks)].tolist() == want_blocks
    assert (blocks[len(want_blocks) :] == num_virtual).all() and len(ids) == bm * len(blocks)


@needs_triton
@pytest.mark.parametrize("chunk", [5, 16])
@pytest.mark.parametrize("name", sorted(BITS))
def test_a_prefill_piece_runs_the_grouped_gemm_on_the_dequantized_layer(name, chunk, monkeypatch):
    """Many rows per expert (a prefill piece): the layer's experts are dequantized once,
    `chunk` virtual experts at a time (12 here: three chunks or one), and run torch's grouped
    GEMM (bf16 on CUDA), which computes what the reference computes. The threshold is lowered
    to 16 rows an expert: Triton's interpreter runs a Python program per row."""
    from slicemoe.kernels import expert_gemm

    monkeypatch.setattr(expert_gemm, "CHUNK", chunk)
    monkeypatch.setattr(expert_gemm, "GROUPED_ROWS", 16)

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    bits = BITS[name]
    m = model().to(dtype)
    quantize_model(m, bits, codes=True)
    ex = moe_blocks(m)[0].experts.to(device)
    calls = []
    grouped = expert_gemm.grouped
    monkeypatch.setattr(expert_gemm, "grouped", lambda *a: calls.append(1) or grouped(*a))
    tokens = expert_gemm.GROUPED_ROWS * 6  # 2 slots a token: twice the rows that switch
    hidden, idx, w = (t.to(device) for t in inputs(tokens, 2, 6, torch.Generator().manual_seed(2)))
    if bits.low is None:
        idx = idx % 6
    want = ex.reference(hidden.to(dtype), idx, w.to(dtype))
    got = expert_gemm.code_experts(ex, hidden.to(dtype), idx, w.to(dtype))
    assert calls == [1]
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < (1e-6 if not cuda else 1e-2), float(err)


@needs_triton
def test_a_prefill_piece_without_room_for_dequantized_weights_takes_the_tile_kernels(
    monkeypatch,
):
    """The grouped GEMM's dequantized copy cannot be allocated (out of GPU memory, injected):
    the call computes with the tile kernels instead, the same result as they give alone."""
    import torch

    from slicemoe.kernels import expert_gemm

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    m = model().to(dtype)
    quantize_model(m, BITS["mat84"], codes=True)
    ex = moe_blocks(m)[0].experts.to(device)
    tokens = expert_gemm.GROUPED_ROWS * 6
    hidden, idx, w = inputs(tokens, 2, 6, torch.Generator().manual_seed(3))
    hidden, idx, w = hidden.to(device, dtype), idx.to(device), w.to(device, dtype)
    monkeypatch.setattr(expert_gemm, "GROUPED_ROWS", 10**9)
    tiles = expert_gemm.code_experts(ex, hidden, idx, w)
    monkeypatch.setattr(expert_gemm, "GROUPED_ROWS", 256)
    tried = []

    def no_room(*args):
        tried.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(expert_gemm, "dequantize", no_room)
    assert torch.equal(expert_gemm.code_experts(ex, hidden, idx, w), tiles)
    assert tried  # the grouped GEMM was tried first
