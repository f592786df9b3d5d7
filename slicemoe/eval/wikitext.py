"""WikiText perplexity with the sliding-window method for fixed-length models.

The whole text is tokenized once (as `tokenizer(text)`, special tokens included, like the
Hugging Face perplexity guide). Windows of at most `seq_len` tokens start every `stride` tokens;
each scores only the tokens that the previous window did not, with the rest of the window as
context, and the first scores all but the very first token. Every token after the first is thus
scored exactly once, and after the first window with at least `seq_len - stride` tokens before it.

One deviation from the guide: the step is capped at `seq_len - 1`. With `stride == seq_len` the
guide's windows do not overlap, so the first token of every window has nothing to be predicted
from and silently goes unscored; one token of overlap scores it.
"""

from __future__ import annotations

from pathlib import Path

from slicemoe.eval import Task, Window, register

HINT = "set eval.data_path to a text file, e.g. eval.data_path=../shared/data/wikitext-2/test.txt"


def windows(cfg, tokenizer) -> list[Window]:
    # The text is tokenized whole, longer than the model's context: no warning about it, as
    # only windows of seq_len reach the model.
    text = data_file(cfg.data_path).read_text(encoding="utf-8")
    ids = list(tokenizer(text, verbose=False)["input_ids"])
    return sliding_windows(ids, cfg.seq_len, cfg.stride, cfg.limit)


def sliding_windows(
    ids: list[int], seq_len: int, stride: int, limit: int | None = None
) -> list[Window]:
    if seq_len < 2:
        raise ValueError(f"eval.seq_len={seq_len} must be at least 2 (one context, one scored)")
    if not 1 <= stride <= seq_len:
        raise ValueError(f"eval.stride={stride} must be between 1 and eval.seq_len={seq_len}")
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    step = min(stride, seq_len - 1)
    out: list[Window] = []
    begin, scored_end = 0, 1
    while scored_end < len(ids) and (limit is None or len(out) < limit):
        end = min(begin + seq_len, len(ids))
        out.append(Window(input_ids=ids[begin:end], n_context=scored_end - begin))
        begin, scored_end = begin + step, end
    return out


def data_file(path: str | None) -> Path:
    if path is None:
        raise ValueError(f"eval.data_path not set: {HINT}")
    if not Path(path).is_file():
        raise ValueError(f"eval.data_path={path!r} is not a file: {HINT}")
    return Path(path)


TASK = register(Task(name="wikitext", kind="loglik", windows=windows, check_data=data_file))
