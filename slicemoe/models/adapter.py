"""A HF MoE model made a SliceMoE one: its experts quantized (AMAT), its routers deferring to
the runtime that simulates the devices.

Two in-place changes per sparse block, both through the seams the model already has:
- `experts`: its fused weights become the quantized high-bit experts followed by the low-path
  experts (2E "virtual experts"); index e runs expert e at high precision, e + E at low. The
  model's own experts implementation (eager / grouped_mm) then computes whatever mix a token
  needs in one call.
- `gate`: its class is swapped for a subclass whose forward still computes the model's router
  logits (so `output_router_logits` keeps working) but hands the choice of experts and
  precision to a runtime (slicemoe.runtime, slicemoe.tensor_runtime), which simulates the
  devices.
On CUDA the routing (router logits and the runtime's choice) runs on a second stream, beside
whatever the block launches before it (Qwen-MoE's shared expert): a decode step's routing is a
chain of small kernels.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from slicemoe import quant
from slicemoe.config import BitsConfig
from slicemoe.models import EXPERT_BIASES, IN_OUT_EXPERTS, moe_blocks, router_of, selection_bias
from slicemoe.models.code_experts import CodeExperts, supports
from slicemoe.runtime import Bindable

# --- quantization of a loaded model ---------------------------------------------------------


def _qdq(w: torch.Tensor, bits: BitsConfig, in_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized (high path, low path) weights of one fused expert tensor; `in_out`: stored
    (E, in, out), so it is quantized along its middle (input) dimension."""
    if in_out:
        high, low = _qdq(w.transpose(-1, -2), bits, False)
        return high.transpose(-1, -2).contiguous(), low.transpose(-1, -2).contiguous()
    qt = quant.quantize(w, bits.high, bits.group, bits.symmetric)
    high = qt.dequantize(w.dtype)
    if bits.low is None:
        return high, high
    return high, quant.low_path(w, qt, bits.low, bits.scheme).dequantize(w.dtype)


@torch.no_grad()
def quantize_model(model, bits: BitsConfig, codes: bool = False) -> None:
    """Quantize experts (high and low path) and, optionally, the non-expert linear weights.

    `codes`: hold each family's experts once, as codes both paths compute from
    (slicemoe.models.code_experts), where its layout allows; otherwise (and for unquantized
    experts) the two paths are dequantized copies, 2E virtual experts of the family's own module.
    Routers stay as loaded: they are a negligible share of the bytes and routing decisions
    are what the cache policies study, so they should not move with the expert precision.
    """
    blocks = moe_blocks(model)
    in_out = model.config.model_type in IN_OUT_EXPERTS
    silu = getattr(model.config, "hidden_act", None) in ("silu", "swish")
    for block in blocks:
        ex = block.experts
        if codes and bits.high is not None and supports(ex, model.config):
            block.experts = CodeExperts(ex, bits, silu)
            continue
        e = ex.gate_up_proj.shape[0]
        if bits.high is None:  # unquantized experts: the low path is the high path
            pairs = [(p.data, p.data) for p in (ex.gate_up_proj, ex.down_proj)]
        else:
            pairs = [_qdq(p.data, bits, in_out) for p in (ex.gate_up_proj, ex.down_proj)]
        ex.gate_up_proj = torch.nn.Parameter(torch.cat(pairs[0]), requires_grad=False)
        ex.down_proj = torch.nn.Parameter(torch.cat(pairs[1]), requires_grad=False)
        for name in EXPERT_BIASES:  # kept as loaded, for both paths
            if hasattr(ex, name):
                b = getattr(ex, name).data
                setattr(ex, name, torch.nn.Parameter(torch.cat([b, b]), requires_grad=False))
        ex.num_experts = 2 * e
    if bits.nonexpert_bits is None:
        return
    routers = {id(p) for b in blocks for p in router_of(b).parameters()}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in routers:
            w = module.weight.data
            if w.shape[-1] % bits.nonexpert_group == 0:
                qt = quant.quantize(w, bits.nonexpert_bits, bits.nonexpert_group, symmetric=True)
                module.weight.data = qt.dequantize(w.dtype)


# --- the router seam -------------------------------------------------------------------------


# On CUDA each block's routing runs on a second stream, beside the block's earlier work (False:
# one stream; the results are the same).
BESIDE = True


def install(model, runtime: Bindable) -> None:
    """Swap each block's router class for one that defers to the runtime (and, BESIDE, routes
    on a second stream)."""
    device = next(model.parameters()).device
    side = torch.cuda.Stream(device) if BESIDE and device.type == "cuda" else None
    for layer, block in enumerate(moe_blocks(model)):
        gate = router_of(block)
        _subclass(gate, _routed_forward)
        _subclass(block, _forked_forward)
        gate._slicemoe_layer = layer
        gate._slicemoe_runtime = runtime
        gate._slicemoe_linear = _is_linear(gate)
        gate._slicemoe_side = side
        gate._slicemoe_fork = None


def _subclass(module, forward) -> None:
    """Swap `module`'s class, once, for a subclass with `forward`."""
    base = type(module)
    if not getattr(base, "_slicemoe", False):
        module.__class__ = type(
            f"Slice{base.__name__}", (base,), {"forward": forward, "_slicemoe": True}
        )


@torch.no_grad()
def _is_linear(router) -> bool:
    """Whether the family's router forward gives F.linear(hidden, router.weight) as its logits,
    one row a token (checked on a probe): they are then computed alone, without the family's
    own softmax and top-k, which the runtime's routing replaces."""
    w = getattr(router, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or getattr(router, "bias", None) is not None:
        return False
    probe = torch.randn((1, 3, w.shape[1]), generator=torch.Generator().manual_seed(0)).to(w)
    try:
        out = super(type(router), router).forward(probe)
    except (TypeError, ValueError, RuntimeError, IndexError):  # it wants more, or 2D
        return False
    logits = out[0] if isinstance(out, tuple) else out
    flat = F.linear(probe.reshape(-1, w.shape[1]), w)
    return isinstance(logits, torch.Tensor) and torch.equal(logits, flat)


def _logits(router, hidden: torch.Tensor, args: tuple) -> torch.Tensor:
    """The family's router logits for `hidden` (`args`: what its block passes beside it)."""
    if getattr(router, "_slicemoe_linear", False) and not args:
        return F.linear(hidden.reshape(-1, router.weight.shape[1]), router.weight)
    forward = (
        super(type(router), router).forward if hasattr(router, "_slicemoe") else router.forward
    )
    return forward(hidden, *args)[0]


def router_logits(block, hidden: torch.Tensor):
    """A block's own router logits for `hidden` and its selection-only bias, without the
    runtime's routing (for predictors that score another layer's input)."""
    router = router_of(block)
    # MiniMax-M2, AFMoE and LFM2 keep the bias on the block and pass it to the router.
    args = tuple(
        getattr(block, n)
        for n in ("e_score_correction_bias", "expert_bias")
        if isinstance(getattr(block, n, None), torch.Tensor)
    )[:1]
    return _logits(router, hidden, args), selection_bias(router, args)


def _forked_forward(self, hidden_states, *args, **kwargs):
    """A sparse block's forward: with a side stream, it first waits there for the work before
    the block, and tells its router which input that work made."""
    gate = router_of(self)
    if gate._slicemoe_side is not None:
        gate._slicemoe_side.wait_stream(torch.cuda.current_stream())
        gate._slicemoe_fork = hidden_states.data_ptr()
    try:
        return super(type(self), self).forward(hidden_states, *args, **kwargs)
    finally:
        gate._slicemoe_fork = None


def _routed_forward(self, hidden_states, *args):
    # On the side stream only when it routes the block's own input (what the side stream
    # waited for): a family that transforms it inside the block routes on the block's stream.
    side = self._slicemoe_side
    beside = side is not None and self._slicemoe_fork == hidden_states.data_ptr()
    with torch.cuda.stream(side) if beside else nullcontext():
        logits = _logits(self, hidden_states, args)
        bias = selection_bias(self, args)
        weights, idx = self._slicemoe_runtime.routed(
            self._slicemoe_layer, logits, bias, hidden_states
        )
    if beside:
        torch.cuda.current_stream().wait_stream(side)
    return logits, weights, idx


__all__ = ["install", "quantize_model", "router_logits"]
