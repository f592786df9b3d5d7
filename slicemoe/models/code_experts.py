"""Routed experts held once, as the quantized codes a device stores, for both precision paths.

AMAT's point is that the low-bit expert is the MSB slice of the high-bit one: `q >> (h - l)`
with the zero-point truncated alike and the scale times 2^(h - l) (slicemoe.quant.low_path). So
one uint8 code per weight (with per-group scales and both paths' zero-points) serves the high
path and the low path; `bits.scheme=base`, whose low-bit experts are quantized on their own,
keeps its second copy of codes. The module replaces a family's experts (same call: hidden states,
top-k virtual indices, top-k weights; index e runs expert e on the high path, e + E on the low
path) and computes with the weights dequantized exactly as `quant.QTensor.dequantize` does:
- on CUDA, a grouped GEMM that dequantizes inside the kernel (slicemoe.kernels.expert_gemm);
- elsewhere, and as that kernel's reference, per used expert with plain PyTorch.
Families with another expert layout (gpt-oss: transposed, interleaved, biased) keep the
dequantized copies of slicemoe.models.adapter.quantize_model.
"""

from __future__ import annotations

import torch
from torch import nn

from slicemoe import quant
from slicemoe.config import BitsConfig

PROJECTIONS = ("gate_up_proj", "down_proj")


def supports(experts: nn.Module, config) -> bool:
    """Whether `experts` has the standard fused layout: [E, 2I, H] gate then up, [E, H, I]
    down, no biases, no norm after the expert."""
    standard = (
        getattr(experts, "has_gate", True)
        and not getattr(experts, "has_bias", False)
        and not getattr(experts, "has_post_expert_norm", False)
        and not getattr(experts, "is_transposed", False)
        and getattr(experts, "is_concatenated", True)
    )
    return (
        bool(standard)
        and all(hasattr(experts, p) for p in PROJECTIONS)
        and hasattr(experts, "act_fn")
    )


class CodeExperts(nn.Module):
    def __init__(self, experts: nn.Module, bits: BitsConfig, silu: bool):
        """Quantize `experts`' weights to codes (their float weights are not kept); `silu`: the
        family's activation is SiLU, which the CUDA kernel fuses."""
        super().__init__()
        if bits.high is None:
            raise ValueError("CodeExperts holds quantized experts; bits.high is null")
        self.num_experts = experts.gate_up_proj.shape[0]  # E; virtual indices run to 2E
        self.dtype = experts.gate_up_proj.dtype
        self.act_fn, self.silu = experts.act_fn, silu
        self.bits = bits
        self.nested = bits.low is not None and bits.scheme != "base"
        self.shift = bits.high - bits.low if self.nested else 0
        for name in PROJECTIONS:
            self._store(name, getattr(experts, name).data, bits)

    def _store(self, name: str, w: torch.Tensor, bits: BitsConfig) -> None:
        high = quant.quantize(w, bits.high, bits.group, bits.symmetric)
        low = high if bits.low is None else quant.low_path(w, high, bits.low, bits.scheme)
        copies = [high] if bits.scheme != "base" or bits.low is None else [high, low]
        # codes [copies, E, out, in]; scales [copies, E, out, groups]; zero-points of the high
        # and the low path [2, E, out, groups] (integer values, at most 8 bits)
        self.register_buffer(f"{name}_q", torch.stack([c.q for c in copies]))
        self.register_buffer(f"{name}_scale", torch.stack([c.scale for c in copies]))
        self.register_buffer(f"{name}_zp", torch.stack([high.zp, low.zp]).to(torch.uint8))

    def qtensor(self, name: str, expert: int, low: bool) -> quant.QTensor:
        """The codes, scales and zero-points expert `expert` computes `name` with on a path."""
        copy = 1 if low and self.bits.scheme == "base" and self.bits.low is not None else 0
        q = getattr(self, f"{name}_q")[copy, expert]
        scale = getattr(self, f"{name}_scale")[copy, expert]
        shift = self.shift if low else 0
        return quant.QTensor(
            q >> shift,
            scale * 2**shift,
            getattr(self, f"{name}_zp")[int(low), expert].float(),
            self.bits.low if low and self.bits.low is not None else self.bits.high,
            self.bits.group,
            self.bits.symmetric,
        )

    def weight(self, name: str, virtual: int) -> torch.Tensor:
        e = self.num_experts
        return self.qtensor(name, virtual % e, virtual >= e).dequantize(self.dtype)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights):
        if hidden.is_cuda and self.silu:
            from slicemoe.kernels.expert_gemm import code_experts

            return code_experts(self, hidden, top_k_index, top_k_weights)
        return self.reference(hidden, top_k_index, top_k_weights)

    def reference(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights):
        """Each used (expert, path) with its dequantized weights, as the family computes it."""
        out = torch.zeros_like(hidden)
        for v in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == v)
            gate, up = nn.functional.linear(hidden[token], self.weight("gate_up_proj", v)).chunk(
                2, dim=-1
            )
            y = nn.functional.linear(self.act_fn(gate) * up, self.weight("down_proj", v))
            y = y * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out
