from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slicemoe.config import EvalConfig
from slicemoe.eval import arith
from slicemoe.eval.gsm8k import score_gsm8k_style

CKPT = Path(__file__).resolve().parents[1] / "slicemoe" / "checkpoints" / "tiny"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(CKPT, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    m = AutoModelForCausalLM.from_pretrained(CKPT, local_files_only=True, dtype=torch.float32)
    return m.eval()


def test_files_and_size():
    names = {p.name for p in CKPT.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert sum(p.stat().st_size for p in CKPT.iterdir()) <= 20 * 1024 * 1024


def test_architecture(model):
    c = model.config
    assert c.model_type == "qwen2_moe"
    assert c.num_hidden_layers >= 6 and c.num_experts >= 32 and c.num_experts_per_tok == 4
    assert c.shared_expert_intermediate_size > 0 and not c.norm_topk_prob
    mlp = model.model.layers[0].mlp
    assert hasattr(mlp, "shared_expert") and hasattr(mlp, "experts")
    assert mlp.experts.gate_up_proj.shape[0] == c.num_experts


def test_tokenizer_round_trip(tok):
    s = "Question: Ava has 12 pens.\nAnswer: 12+3=15. #### 15\n\n ~{|}`'\"!"
    ids = tok.encode(s)
    assert len(ids) == len(s)  # one token per character, no specials added
    assert tok.decode(ids) == s
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.decode(tok.encode("é")) == tok.unk_token


def test_greedy_solves_held_out_problems(model, tok):
    docs = arith.docs(EvalConfig(limit=12, num_fewshot=5), tok)
    enc = tok([d.prompt for d in docs], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=64, do_sample=False)
    hits = 0
    for d, row in zip(docs, out[:, enc["input_ids"].shape[1] :]):
        text = tok.decode(row, skip_special_tokens=True)
        for s in arith.STOP:
            text = text.split(s)[0]
        hits += score_gsm8k_style(d, text)["accuracy"]
    # Random weights score 0; the trained model gets about 4 in 5 of these.
    assert hits >= 6, hits
