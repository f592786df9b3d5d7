"""Train the shipped tiny Qwen2-MoE on synthetic arithmetic plus a little real text.

GPU (the shipped checkpoint; see train/README.md for the exact command and numbers):
    python train/train_tiny.py --data .dev_tiny/data --out OUT --time_budget 440
CPU smoke run:
    python train/train_tiny.py --data DATA --out /tmp/tiny --steps 50 --batch 4 --seq_len 256 \
        --layers 2 --eval_n 8
Measure an existing checkpoint only:
    python train/train_tiny.py --eval_only slicemoe/checkpoints/tiny --data DATA --out /tmp/m

DATA holds gsm8k_train.jsonl, wiki_valid.txt (training text) and wiki_test.txt (perplexity).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from slicemoe.config import EvalConfig  # noqa: E402
from slicemoe.eval import arith  # noqa: E402
from slicemoe.eval.gsm8k import score_gsm8k_style  # noqa: E402

SPECIALS = ["<pad>", "<eos>", "<unk>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
PAD, EOS, UNK = 0, 1, 2
# Training difficulty mixture: eval levels sit inside it, and the neighbours on either side let
# the eval level be chosen after training by the measured accuracy grid.
TRAIN_STEPS = {2: 0.2, 3: 0.5, 4: 0.3}
TRAIN_DIGITS = {2: 0.45, 3: 0.35, 4: 0.2}
TRAIN_MUL = {0: 0.2, 1: 0.3, 2: 0.5}
MIX = {"arith": 0.8, "gsm8k": 0.1, "wiki": 0.1}
# Per-level accuracy grid measured after training (the task's level set is chosen from it).
GRID = [(3, 2, 2), (2, 2, 2), (3, 3, 2), (2, 3, 2), (4, 2, 2), (3, 2, 1), (3, 3, 1), (3, 3, 0)]


def get_args():
    p = argparse.ArgumentParser()
    p.add_argument("--data")
    p.add_argument("--out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="fixed step count (else time_budget)")
    p.add_argument("--time_budget", type=float, default=None, help="seconds of training")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq_len", type=int, default=1280)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--moe_inter", type=int, default=64)
    p.add_argument("--shared_inter", type=int, default=256)
    p.add_argument("--aux_coef", type=float, default=0.01)
    p.add_argument("--eval_n", type=int, default=200)
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--eval_only", default=None, help="checkpoint dir: skip training, measure it")
    p.add_argument("--plot", default=None, help="loss.csv: draw loss.png beside it and exit")
    return p.parse_args()


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # One token per character; Fuse joins them back without the spaces WordLevel would insert.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )


# Byte -> id table for the data workers; characters outside the vocabulary were mapped to \x00.
LUT = np.full(256, UNK, dtype=np.int64)
for _i, _c in enumerate(CHARS):
    LUT[ord(_c)] = len(SPECIALS) + _i
KNOWN = set(CHARS)


def clean(text: str) -> str:
    return "".join(c if c in KNOWN else "\x00" for c in text)


def encode(text: str) -> np.ndarray:
    return LUT[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]


def pick(rng: random.Random, weights: dict):
    return rng.choices(list(weights), weights=list(weights.values()))[0]


class Stream(torch.utils.data.IterableDataset):
    """Endless batches of packed Question/Answer blocks (few-shot shaped) and real text."""

    def __init__(self, args, gsm_blocks, wiki):
        self.args, self.gsm, self.wiki = args, gsm_blocks, wiki

    def sequence(self, rng: random.Random) -> str:
        n = self.args.seq_len + 1
        kind = pick(rng, MIX)
        if kind == "wiki":
            i = rng.randrange(len(self.wiki) - n)
            return self.wiki[i : i + n]
        parts, size = [], 0
        level = pick(rng, TRAIN_STEPS), pick(rng, TRAIN_DIGITS), pick(rng, TRAIN_MUL)
        while size < n:
            if kind == "arith":
                b = arith.sample_split(rng, "train", level).block()
            else:
                b = self.gsm[rng.randrange(len(self.gsm))]
            parts.append(b)
            size += len(b)
        return "".join(parts)[:n]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        rng = random.Random(f"train/{self.args.seed}/{wid}")
        while True:
            seqs = [encode(self.sequence(rng)) for _ in range(self.args.batch)]
            yield torch.from_numpy(np.stack(seqs))


def load_data(d: str):
    gsm = []
    with open(os.path.join(d, "gsm8k_train.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            gsm.append(clean(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n"))
    with open(os.path.join(d, "wiki_valid.txt")) as f:
        wiki = clean(f.read())
    return gsm, wiki


def make_model(args, tok) -> Qwen2MoeForCausalLM:
    cfg = Qwen2MoeConfig(
        vocab_size=128,  # 99 tokens used; rounded up for aligned matmuls
        hidden_size=args.hidden,
        intermediate_size=args.shared_inter,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        moe_intermediate_size=args.moe_inter,
        shared_expert_intermediate_size=args.shared_inter,
        num_experts=args.experts,
        num_experts_per_tok=args.topk,
        norm_topk_prob=False,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
    )
    torch.manual_seed(args.seed)
    return Qwen2MoeForCausalLM(cfg)


def lr_at(step: int, total: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, total - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train(args, tok, dev):
    gsm, wiki = load_data(args.data)
    model = make_model(args, tok).to(dev)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"params {nparams / 1e6:.2f}M", flush=True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=dev.type == "cuda",
    )
    loader = torch.utils.data.DataLoader(
        Stream(args, gsm, wiki),
        batch_size=None,
        num_workers=args.workers,
        prefetch_factor=4 if args.workers else None,
        persistent_workers=args.workers > 0,
    )
    cuda = dev.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    total = args.steps or 10**9
    log = open(os.path.join(args.out, "loss.csv"), "w", newline="")
    w = csv.writer(log)
    w.writerow(["step", "tokens", "lr", "loss", "lm_loss", "aux_loss", "elapsed_s"])
    t0 = t1 = time.time()
    it = iter(loader)
    step = 0
    while step < total:
        x = next(it).to(dev, non_blocking=True)
        lr = lr_at(step, total, args)
        for g in opt.param_groups:
            g["lr"] = lr
        with amp:
            out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step == 30 and args.steps is None:
            # Fix the schedule once the step time is known, so the cosine decay ends on time.
            if dev.type == "cuda":
                torch.cuda.synchronize()
            per = (time.time() - t1) / 20
            total = max(step + 1, int(args.time_budget / per))
            print(f"{per * 1000:.1f} ms/step -> total steps {total}", flush=True)
        if step == 10:
            t1 = time.time()
        if step % 25 == 0 or step == total:
            aux = out.aux_loss.item()
            loss = out.loss.item()
            lm = loss - args.aux_coef * aux
            el = time.time() - t0
            w.writerow(
                [
                    step,
                    step * x.numel(),
                    f"{lr:.3e}",
                    f"{loss:.4f}",
                    f"{lm:.4f}",
                    f"{aux:.4f}",
                    f"{el:.1f}",
                ]
            )
            log.flush()
            if step % 100 == 0 or step == total:
                print(
                    f"step {step}/{total} lm {lm:.4f} aux {aux:.3f} lr {lr:.2e} {el:.0f}s",
                    flush=True,
                )
    log.close()
    try:
        plot_loss(log.name)
    except ImportError:
        pass
    train_s = time.time() - t0
    return model, {
        "steps": step,
        "train_seconds": round(train_s, 1),
        "params": nparams,
        "final_lm_loss": lm,
    }


@torch.no_grad()
def generate(model, tok, prompts, max_new_tokens=64, bs=100):
    dev = next(model.parameters()).device
    outs = []
    for i in range(0, len(prompts), bs):
        enc = tok(prompts[i : i + bs], return_tensors="pt", padding=True).to(dev)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=EOS,
        )
        for row in gen[:, enc["input_ids"].shape[1] :]:
            text = tok.decode(row, skip_special_tokens=True)
            for s in arith.STOP:
                text = text.split(s)[0]
            outs.append(text)
    return outs


def arith_accuracy(model, tok, levels, n, seed=1234):
    docs = arith.docs(EvalConfig(limit=n, num_fewshot=5, seed=seed), tok, levels)
    texts = generate(model, tok, [d.prompt for d in docs])
    scores = [score_gsm8k_style(d, t) for d, t in zip(docs, texts)]
    acc = sum(s["accuracy"] for s in scores) / n
    flex = sum(s["accuracy_flexible"] for s in scores) / n
    return acc, flex, docs, texts


@torch.no_grad()
def perplexity(model, path, window=256, stride=256):
    """Character-level perplexity: every character after the first is scored exactly once."""
    dev = next(model.parameters()).device
    with open(path) as f:
        ids = torch.from_numpy(encode(clean(f.read())))
    nll, count, prev_end = 0.0, 0, 0
    batch = []
    for s in range(0, len(ids) - 1, stride):
        e = min(s + window, len(ids))
        n_ctx = max(prev_end - s, 1) if s else 1  # positions already scored are context only
        batch.append((ids[s:e], n_ctx))
        prev_end = e
        if len(batch) == 64 or e == len(ids):
            L = max(len(b) for b, _ in batch)
            x = torch.full((len(batch), L), PAD, dtype=torch.long)
            m = torch.zeros_like(x)
            for k, (b, _) in enumerate(batch):
                x[k, : len(b)], m[k, : len(b)] = b, 1
            logits = model(input_ids=x.to(dev), attention_mask=m.to(dev)).logits.float()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None].to(dev))[..., 0]
            for k, (b, c) in enumerate(batch):
                nll -= lp[k, c - 1 : len(b) - 1].sum().item()
                count += len(b) - c
            batch = []
        if e == len(ids):
            break
    return math.exp(nll / count), count


@torch.no_grad()
def expert_entropy(model, tok, docs):
    """Per-layer entropy of top-k expert selection counts over held-out prompts, / log(E)."""
    cfg = model.config
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_experts)
    dev = next(model.parameters()).device
    for d in docs:
        x = tok(d.prompt + " " + d.meta["answer"], return_tensors="pt").input_ids.to(dev)
        out = model(input_ids=x, output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):
            idx = logits.float().topk(cfg.num_experts_per_tok, -1).indices.flatten().cpu()
            counts[layer] += torch.bincount(idx, minlength=cfg.num_experts).float()
    p = counts / counts.sum(-1, keepdim=True)
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(cfg.num_experts)
    return [round(v, 3) for v in ent.tolist()], int((counts > 0).sum(-1).min())


def measure(model, tok, args):
    model.eval()
    res = {"arith_5shot_greedy": {}}
    # The task's own levels first (the headline number), then each level alone.
    for levels in [arith.EVAL_LEVELS] + [(lv,) for lv in GRID if args.grid]:
        t = time.time()
        acc, flex, docs, texts = arith_accuracy(model, tok, levels, args.eval_n)
        key = "arith" if len(levels) > 1 else "steps{}_digits{}_mul{}".format(*levels[0])
        res["arith_5shot_greedy"][key] = {"strict": acc, "flexible": flex, "n": args.eval_n}
        print(f"arith {key}: strict {acc:.3f} flexible {flex:.3f} ({time.time() - t:.0f}s)")
        print("  e.g.", repr(texts[-1]), "target", docs[-1].target, flush=True)
    docs = arith.docs(EvalConfig(limit=48, num_fewshot=5, seed=1234), tok)
    ent, min_used = expert_entropy(model, tok, docs)
    res["expert_entropy_norm"], res["min_experts_used_per_layer"] = ent, min_used
    print("expert entropy / log(E) per layer:", ent, "min experts used:", min_used, flush=True)
    wt = os.path.join(args.data, "wiki_test.txt")
    if os.path.exists(wt):
        ppl, n = perplexity(model, wt)
        res["wikitext2_test_char_ppl"] = {
            "ppl": round(ppl, 3),
            "window": 256,
            "stride": 256,
            "chars": n,
        }
        print(f"wikitext-2 test char ppl {ppl:.3f} (window 256, stride 256, {n} chars)", flush=True)
    return res


def plot_loss(csv_path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    step = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(step, [float(r["lm_loss"]) for r in rows], lw=0.8)
    ax.set(xlabel="step", ylabel="LM loss (nats/char)", yscale="log", title="tiny Qwen2-MoE")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(os.path.dirname(csv_path), "loss.png"), dpi=120)


def main():
    args = get_args()
    if args.plot:
        return plot_loss(args.plot)
    os.makedirs(args.out, exist_ok=True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.eval_only:
        tok = AutoTokenizer.from_pretrained(args.eval_only)
        model = AutoModelForCausalLM.from_pretrained(args.eval_only, dtype=torch.float32).to(dev)
        info = {"checkpoint": args.eval_only}
    else:
        tok = build_tokenizer()
        with open(os.path.join(args.out, "train_args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
        model, info = train(args, tok, dev)
        # Measure what ships: round to fp16 and back.
        model = model.half().float()
        model.config.output_router_logits = False
        model.generation_config = GenerationConfig(
            pad_token_id=PAD, eos_token_id=EOS, do_sample=False, max_new_tokens=64
        )
        model.half().save_pretrained(os.path.join(args.out, "tiny"))
        tok.save_pretrained(os.path.join(args.out, "tiny"))
        model.float()
    torch.backends.cuda.matmul.allow_tf32 = False
    info.update(measure(model, tok, args))
    info["args"] = vars(args)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps({k: v for k, v in info.items() if k != "args"}))


if __name__ == "__main__":
    main()
