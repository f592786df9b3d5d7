"""Router traces from a plain Hugging Face `generate`, so that traces taken on a serving box are
simulated elsewhere (slicemoe.traces, docs/traces.md).

Forward hooks on each MoE block's router (found by the family table, slicemoe.models) of an
unmodified model read, in every forward pass, the router's input and logits; the family's own
gate rule (slicemoe.routing) turns them into the chosen experts and their normalised gate
scores, and the next layer's router applied to the same input gives the pre-gating ranking
(slicemoe.prefetch.pre_gate), as the simulator's model pass computes them. Nothing is simulated
and the model's outputs are untouched. After `generate`, each row keeps its prompt tokens (no
padding) and the decode passes before the one its eos or stop string would have fed, as a model
pass of the simulator records a sequence.

    python -m slicemoe.hf_trace --model DIR --prompts prompts.jsonl --max-new-tokens 64 --out trace.npz
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from slicemoe import traces
from slicemoe.models import check_checkpoint, gate_rule, moe_blocks, router_of, selection_bias
from slicemoe.models.adapter import router_logits
from slicemoe.prefetch import pre_gate
from slicemoe.routing import RoutingParams, normalised, topk
from slicemoe.simulator import left_pad
from slicemoe.stream import NEXT_GATE_DEPTH


class RouterHooks:
    """The routing of every forward pass of one `generate` call, by hooks:

        with RouterHooks(model) as hooks:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n)
        arrays = hooks.sequences(mask, out[:, ids.shape[1]:], eos=...)

    The first pass is the prefill; every later one must feed one token per row (a KV cache,
    no assisted decoding)."""

    def __init__(self, model):
        self.blocks, self.gate = moe_blocks(model), gate_rule(model.config)
        self.num_experts = self.blocks[0].experts.down_proj.shape[0]
        self.depth = min(NEXT_GATE_DEPTH, self.num_experts)
        self.passes: list[list[tuple]] = []  # per forward pass, per layer: what `_hook` keeps
        self.handles = []

    def __enter__(self) -> RouterHooks:
        self.passes = []
        self.handles = [
            router_of(block).register_forward_hook(self._hook_of(layer))
            for layer, block in enumerate(self.blocks)
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook_of(self, layer: int):
        def hook(router, args, output):
            if layer == 0:
                self.passes.append([])
            hidden, logits = args[0], output[0]
            logits = logits.reshape(-1, logits.shape[-1])
            bias = selection_bias(router, args[1:])
            idx, weights = topk(self.gate, logits, None, RoutingParams(bias=bias))
            kept = (idx, normalised(weights))
            if len(self.passes) > 1 and layer + 1 < len(self.blocks):  # decode: pre-gating
                # router_logits calls the next router's forward, not the module: no hook runs
                logits, bias = router_logits(self.blocks[layer + 1], hidden)
                kept += pre_gate(self.gate, logits.reshape(-1, logits.shape[-1]), bias, self.depth)
            elif len(self.passes) > 1:  # after the last layer no ranking, as the simulator's
                kept += (torch.full((len(idx), self.depth), -1, device=idx.device),
                         torch.zeros_like(kept[1]))  # fmt: skip
            self.passes[-1].append(tuple(t.detach() for t in kept))

        return hook

    def sequences(self, mask: torch.Tensor, generated: torch.Tensor, eos=(), stop=(),
                  tokenizer=None) -> dict:  # fmt: skip
        """The trace's arrays (slicemoe.traces fields) of the generate call's rows: `mask`
        [B, S] the prompt's attention mask (0 at padding), `generated` [B, T] the new tokens
        (generate's output after the prompt), `eos` the end-of-sequence token ids, `stop` stop
        strings (read with `tokenizer`). Row b keeps decode passes 0..j-1, where token j is its
        first eos or completes its first stop string."""
        layers, k = len(self.blocks), self.gate.top_k
        rows, s = mask.shape
        passes, self.passes = self.passes, []
        if not passes or any(len(p) != layers for p in passes):
            raise RuntimeError("the hooks did not see every MoE layer of each forward pass")
        if len(passes) != generated.shape[1]:
            raise RuntimeError(
                f"{len(passes)} forward passes for {generated.shape[1]} new tokens: one pass "
                "per token is needed (use_cache=True, no assisted or chunked decoding)"
            )
        if passes[0][0][0].shape[0] != rows * s or any(
            kept[0].shape[0] != rows for p in passes[1:] for kept in p
        ):
            raise RuntimeError(
                "the passes did not route one row per prompt (no beam search or several "
                "returned sequences per prompt)"
            )
        # Prefill: each row's prompt tokens (not its padding) routed to each expert, per layer.
        device = passes[0][0][0].device
        valid = mask.to(device, torch.long)[..., None].expand(rows, s, k).reshape(rows, s * k)
        counts = torch.zeros((rows, layers, self.num_experts), dtype=torch.long, device=device)
        for layer, (idx, _) in enumerate(passes[0]):
            counts[:, layer].scatter_add_(1, idx.view(rows, s * k), valid)
        steps = _ends(generated.cpu().numpy(), eos, stop, tokenizer)

        def per_row(i: int, width: int, dtype) -> np.ndarray:
            """Field i of the decode passes, [T - 1, L, B, width] -> the rows' steps [N, L, width]."""
            if len(passes) == 1:
                return np.zeros((0, layers, width), dtype)
            x = torch.stack([torch.stack([kept[i] for kept in p]) for p in passes[1:]])
            x = x.transpose(1, 2).cpu().numpy().astype(dtype)
            return np.concatenate([x[: steps[b], b] for b in range(rows)])

        experts = np.int16 if self.num_experts < 2**15 else np.int32
        return {
            "prompt_len": mask.sum(1).cpu().numpy().astype(np.int32),
            "decode_steps": steps.astype(np.int32),
            "experts": per_row(0, k, experts),
            "prefill_counts": counts.cpu().numpy().astype(np.int32),
            "gate_scores": per_row(1, k, np.float32),
            "next_gate": per_row(2, self.depth, experts),
            "next_gate_scores": per_row(3, k, np.float32),
        }


def _ends(generated: np.ndarray, eos, stop, tokenizer) -> np.ndarray:
    """Per row, the decode passes it ran: the index of its first token that is an eos or
    completes a stop string (that token is never fed), or all T - 1 passes."""
    rows, new = generated.shape
    ends = np.full(rows, max(new - 1, 0))
    for b in range(rows):
        hit = np.nonzero(np.isin(generated[b], list(eos)))[0]
        if hit.size:
            ends[b] = min(ends[b], hit[0])
        if not stop or not any(s in tokenizer.decode(generated[b].tolist()) for s in stop):
            continue
        for j in range(int(ends[b])):  # the first prefix whose text holds a stop string
            if any(s in tokenizer.decode(generated[b, : j + 1].tolist()) for s in stop):
                ends[b] = j
                break
    return ends


@torch.no_grad()
def record(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8,
           stop=(), tokenizer=None, **options) -> dict:  # fmt: skip
    """The trace's arrays of `model.generate` on `prompts` (token lists), in batches of
    `batch_size` rows left-padded with the model's pad token (else its eos), greedy unless
    `options` (more generate arguments) say otherwise; `stop` strings end a row as its eos does
    (generate is given them too, with `tokenizer`)."""
    gen = model.generation_config
    eos = options.get("eos_token_id", gen.eos_token_id)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = options.get("pad_token_id", gen.pad_token_id)
    if pad is None:
        pad = eos[0] if eos else 0
    options = {"do_sample": False, **options, "pad_token_id": pad}
    if stop:
        options.update(stop_strings=list(stop), tokenizer=tokenizer)
    device = next(model.parameters()).device
    hooks, batches = RouterHooks(model), []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start : start + batch_size], pad)
        s = ids.shape[1]
        with hooks:
            out = model.generate(
                ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                **options,
            )  # fmt: skip
        batches.append(hooks.sequences(mask, out[:, s:], eos, stop, tokenizer))
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


# --- the command line ----------------------------------------------------------------------


def read_prompts(path: str) -> list[str]:
    """A .jsonl file (each line a JSON string or an object with a "prompt"), or any other text
    file with one prompt per non-empty line."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not path.endswith(".jsonl"):
        return lines
    prompts = [json.loads(line) for line in lines]
    return [p if isinstance(p, str) else p["prompt"] for p in prompts]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m slicemoe.hf_trace", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", required=True, help="a local HF checkpoint directory")
    parser.add_argument(
        "--prompts",
        required=True,
        help='a .jsonl file (per line a JSON string or {"prompt": ...}) or a text file (a prompt '
        "per line)",
    )
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--out", required=True, help="the trace file to write (.npz)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--stop", action="append", default=[], help="a stop string (repeatable; $'\\n\\n' in bash)"
    )
    parser.add_argument(
        "--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16 or float16"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = parser().parse_args(argv)
    t0 = time.time()
    check_checkpoint(args.model)  # no pickle weights, no remote code
    tok = AutoTokenizer.from_pretrained(args.model)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=dtype, use_safetensors=True, use_kernels=False
    )
    model = model.to(args.device).eval()
    prompts = [tok(p)["input_ids"] for p in read_prompts(args.prompts)]
    t1 = time.time()
    arrays = record(model, prompts, args.max_new_tokens, args.batch_size, args.stop, tok)
    source = (
        f"slicemoe.hf_trace: {args.model}, {len(prompts)} prompts of {args.prompts}, greedy, "
        f"max_new_tokens={args.max_new_tokens}, stop={args.stop}"
    )
    out = traces.write(args.out, arrays, source=source, model=model.config.name_or_path)
    print(
        f"{out}: {len(prompts)} sequences, {int(arrays['decode_steps'].sum())} decode steps "
        f"(load {t1 - t0:.1f} s, generate {time.time() - t1:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
