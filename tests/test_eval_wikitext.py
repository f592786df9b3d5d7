from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from slicemoe.config import EvalConfig
from slicemoe.eval import get_task
from slicemoe.eval.wikitext import sliding_windows, windows

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "test.txt"


class CharTokenizer:
    """One token per character, the id being its position in the text, so windows are checkable."""

    def __call__(self, text, verbose=True):
        return {"input_ids": list(range(len(text)))}


def scored(ws):
    return [t for w in ws for t in w.input_ids[w.n_context :]]


@pytest.mark.parametrize(
    "n,seq_len,stride",
    [
        (1000, 256, 256),
        (1000, 256, 128),
        (1000, 256, 1),
        (1000, 2, 2),
        (1000, 2, 1),
        (257, 256, 256),
        (256, 256, 256),
        (255, 256, 64),
        (2, 8, 8),
        (999, 100, 37),
        (1000, 10, 9),
    ],
)
def test_every_token_but_the_first_scored_once(n, seq_len, stride):
    ws = sliding_windows(list(range(n)), seq_len, stride)
    assert sorted(scored(ws)) == list(range(1, n))
    for w in ws:
        assert 1 <= w.n_context < len(w.input_ids) <= seq_len
        assert w.input_ids == list(range(w.input_ids[0], w.input_ids[0] + len(w.input_ids)))
    assert ws[0].input_ids[0] == 0 and ws[0].n_context == 1


@pytest.mark.parametrize("seq_len,stride", [(256, 100), (256, 128), (64, 63), (50, 1)])
def test_overlapping_windows_follow_the_hf_recipe(seq_len, stride):
    # The guide's loop, verbatim in spirit: the model scores the last trg_len labels of each
    # window, and loses the first label of a window to the internal shift.
    ids, expected, prev_end = list(range(1000)), [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + seq_len, len(ids))
        trg_len = end - prev_end
        expected.append((ids[begin:end], min(trg_len, end - begin - 1)))
        prev_end = end
        if end == len(ids):
            break
    ws = sliding_windows(ids, seq_len, stride)
    assert [(w.input_ids, len(w.input_ids) - w.n_context) for w in ws] == expected
    assert all(w.n_context == seq_len - stride for w in ws[1:])


def test_limit_takes_the_first_windows():
    ids = list(range(1000))
    full = sliding_windows(ids, 64, 32)
    assert sliding_windows(ids, 64, 32, limit=3) == full[:3]
    assert sliding_windows(ids, 64, 32, limit=0) == []
    assert sliding_windows(ids, 64, 32, limit=10**6) == full


def test_windows_from_file(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world, " * 40)
    cfg = EvalConfig(task="wikitext", data_path=str(text), seq_len=32, stride=16, limit=5)
    ws = windows(cfg, CharTokenizer())
    assert len(ws) == 5 and ws[0].input_ids == list(range(32))
    cfg.limit = None
    assert sorted(scored(windows(cfg, CharTokenizer()))) == list(range(1, 13 * 40))


def test_registered():
    task = get_task("wikitext")
    assert task.kind == "loglik" and task.windows is windows


def test_errors(tmp_path):
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="eval.data_path"):
        windows(EvalConfig(task="wikitext", data_path=str(tmp_path / "missing.txt")), tok)
    with pytest.raises(ValueError, match="eval.data_path"):
        windows(EvalConfig(task="wikitext", data_path=str(tmp_path)), tok)  # a directory
    # Data never comes from the network: an unset path is refused, `datasets` installed or not.
    with pytest.raises(ValueError, match="eval.data_path not set"):
        windows(EvalConfig(task="wikitext", data_path=None), tok)
    with pytest.raises(ValueError, match="eval.stride"):
        sliding_windows(list(range(10)), 4, 5)
    with pytest.raises(ValueError, match="eval.stride"):
        sliding_windows(list(range(10)), 4, 0)
    with pytest.raises(ValueError, match="eval.seq_len"):
        sliding_windows(list(range(10)), 1, 1)
    with pytest.raises(ValueError, match="at least 2"):
        sliding_windows([7], 4, 4)


@pytest.mark.skipif(not SHARED.is_file(), reason="shared WikiText-2 data not present")
def test_shared_file_limit():
    cfg = EvalConfig(task="wikitext", data_path=str(SHARED), seq_len=256, stride=256, limit=40)
    ws = windows(cfg, CharTokenizer())
    assert len(ws) == 40 and Counter(len(w.input_ids) for w in ws) == {256: 40}
    assert sum(len(w.input_ids) - w.n_context for w in ws) == 255 * 40
