"""The batches a run gets with `batch_size=auto`: on CUDA the most rows whose memory fits what is
free after loading the model, elsewhere a small fixed batch.

A row's memory is dominated by its static KV cache (every layer's keys and values for the
longest prompt plus the new tokens); the prefill runs in pieces of at most PREFILL_TOKENS
tokens, so its activations are one fixed workspace whatever the batch. The rule is an estimate:
MARGIN keeps room for what it leaves out, and a batch that still runs out of memory is retried
halved (slicemoe.run).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slicemoe.stream import NEXT_GATE_DEPTH

# The batch of `auto` off CUDA, where the host's memory is not the limit but its time is.
CPU_BATCH = 8
# Tokens (rows x positions) one prefill forward pass takes at most with the static KV cache:
# longer prompts are prefilled in pieces of positions, so a large batch's prefill activations
# do not outgrow its KV cache.
PREFILL_TOKENS = 32768
# The share of the free memory a batch may plan on: the rest is for the allocator's
# fragmentation, kernel workspaces and the CUDA graph's pool, which the estimate leaves out.
# (At Qwen1.5-MoE's shape on an H100 batches planned at 46.9 GiB peaked at 43.5 GiB.)
MARGIN = 0.9
# Hidden-size vectors one token holds at once in a forward pass (residual, norms, q/k/v and
# attention output, the MoE block's input and output).
HIDDEN_COPIES = 8
# A row's vocabulary-size vectors: the head's output, the float logits, the batch's copy of
# them and their log-softmax.
LOGIT_COPIES = 4
INDEX_BYTES = 8  # the runtime's counters and indices are int64 / float64


@dataclass(frozen=True)
class Sizes:
    """A model's numbers that a batch's memory depends on (bytes per element from the dtype)."""

    layers: int  # decoder layers with a KV cache
    kv_per_token: int  # key and value elements one token keeps in one such layer
    dtype_bytes: int
    hidden: int
    vocab: int
    moe_layers: int
    experts: int
    top_k: int
    expert_width: int  # a routed expert's intermediate size
    shared_width: int  # the shared experts' intermediate size (0: none)
    ranking_depth: int  # next-gate ranking entries recorded per layer step


def row_bytes(s: Sizes, tokens: int, steps: int) -> int:
    """One row's memory for `tokens` KV slots (prompt + new tokens) and `steps` decode steps:
    its KV cache, attention mask, decode activations and logits, and the runtime's state (the
    cache's per-expert keys and counts, and per step the recorded experts and rankings)."""
    kv = s.layers * s.kv_per_token * s.dtype_bytes * tokens
    mask = tokens * (s.dtype_bytes + 1)  # the additive mask and the bool it is built from
    logits = s.vocab * 4 * LOGIT_COPIES
    per_step = s.moe_layers * (2 * s.top_k + s.ranking_depth + 2)
    state = INDEX_BYTES * (s.moe_layers * 4 * s.experts + steps * per_step)
    return kv + mask + token_bytes(s) + logits + state


def token_bytes(s: Sizes) -> int:
    """Activation bytes of one token in a forward pass: hidden-size vectors, and per routed
    expert its input, gate/up outputs, product and weighted output (the grouped GEMM's sorted
    copies), and the shared experts' gate/up outputs and product."""
    experts = s.top_k * (4 * s.hidden + 4 * s.expert_width) + 3 * s.shared_width
    return s.dtype_bytes * (HIDDEN_COPIES * s.hidden + experts)


def prefill_bytes(s: Sizes, tokens: int) -> int:
    """The prefill's workspace: PREFILL_TOKENS tokens' activations and their mask rows, and at
    most one layer's experts dequantized for both paths (slicemoe.kernels.expert_gemm.grouped
    holds a chunk of them; the gate/up projection, the larger one)."""
    layer = 2 * s.experts * 2 * s.expert_width * s.hidden * s.dtype_bytes
    return PREFILL_TOKENS * (token_bytes(s) + tokens * (s.dtype_bytes + 1)) + layer


def longest_first(prompts) -> np.ndarray:
    """Indices of `prompts` (token lists), longest first, equal lengths in their order: the
    order a model pass runs its sequences in."""
    return np.argsort([-len(p) for p in prompts], kind="stable")


def auto_batches(free: int, s: Sizes, lens, max_new: int, groups: int = 1) -> np.ndarray:
    """For prompts of `lens` tokens run longest first, the sequences (of `groups` rows each) a
    batch takes when it starts at each of them: as many as fit MARGIN of `free` bytes beside
    the prefill's workspace (a batch's KV cache is as long as its first prompt), at least one.
    The budget is then lowered to the least that needs no more batches, so they come out even:
    a short last batch would take as many decode steps as a full one, each nearly as long."""
    lens = np.asarray(lens, dtype=np.int64)
    tokens = lens + max_new
    row = groups * row_bytes(s, tokens, max_new)

    def fit(budget: float) -> np.ndarray:
        return np.maximum(1, (MARGIN * budget - prefill_bytes(s, tokens)) // row).astype(np.int64)

    least, most = 0.0, float(free)
    batches = len(batch_sizes(fit(most)))
    for _ in range(40):  # bisection to well below a row's bytes
        mid = (least + most) / 2
        least, most = (least, mid) if len(batch_sizes(fit(mid))) <= batches else (mid, most)
    return fit(most)


def batch_sizes(plan) -> list[int]:
    """The batches a plan runs (plan[i]: what a batch starting at item i takes), in order."""
    start, taken = 0, []
    while start < len(plan):
        taken.append(int(min(plan[start], len(plan) - start)))
        start += taken[-1]
    return taken


def sizes(config, shape, dtype_bytes: int) -> Sizes:
    """`Sizes` of a transformers config (its text config) and its experts' `Shape`."""
    c = config.get_text_config()
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    if getattr(c, "kv_lora_rank", None):
        # transformers' multi-head latent attention caches the decompressed keys and values.
        kv = heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
    else:
        kv = 2 * (getattr(c, "num_key_value_heads", None) or heads) * head_dim
    shared = getattr(c, "shared_expert_intermediate_size", None) or 0
    shared += (getattr(c, "n_shared_experts", None) or 0) * shape.moe_intermediate
    return Sizes(
        layers=c.num_hidden_layers,
        kv_per_token=kv,
        dtype_bytes=dtype_bytes,
        hidden=c.hidden_size,
        vocab=c.vocab_size,
        moe_layers=shape.num_moe_layers,
        experts=shape.num_experts,
        top_k=shape.top_k,
        expert_width=shape.moe_intermediate,
        shared_width=shared,
        ranking_depth=NEXT_GATE_DEPTH,
    )
