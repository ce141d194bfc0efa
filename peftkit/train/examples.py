"""Samples -> token ids with label masks; truncation, packing and batching.

`labels[i] == input_ids[i]` on target tokens and `-100` (ignored by the loss) elsewhere. Each
segment is tokenized on its own, so the prompt's tokens are exactly those the model sees at
generation time. Non-chat rows get the tokenizer's BOS when it adds one by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .formats import Sample, check_fields, detect_format, to_sample
from .rows import DataError, read_rows

IGNORE = -100


@dataclass
class Encoded:
    """Tokenized dataset plus what happened to it on the way."""

    examples: list[dict[str, list[int]]]
    samples: list[Sample]
    fmt: str
    truncated: int = 0
    dropped: int = 0  # rows left with no target token after truncation
    notes: list[str] = field(default_factory=list)


def encode(sample: Sample, tokenizer, fmt: str) -> dict[str, list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    if fmt != "chat" and _adds_bos(tokenizer):
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE)
    for text, target in sample.segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if target else [IGNORE] * len(piece)
    return {"input_ids": ids, "labels": labels}


def prompt_ids(sample: Sample, tokenizer, fmt: str) -> list[int]:
    """The tokens before the last target segment: what generation starts from."""
    last = max(i for i, (_, target) in enumerate(sample.segments) if target)
    head = Sample(sample.segments[:last], sample.prompt, sample.answer)
    return encode(head, tokenizer, fmt)["input_ids"]


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def check_data(path: str) -> None:
    """Read `path` and check every row's fields, without a tokenizer (before a model loads)."""
    rows = read_rows(path)
    fmt = detect_format(rows[0])
    for row in rows:
        check_fields(row, fmt)


def load_examples(path: str, tokenizer, max_length: int | None = None) -> Encoded:
    """Read, format-check, tokenize and truncate every row of `path`."""
    rows = read_rows(path)
    fmt = detect_format(rows[0])
    samples = [to_sample(row, fmt, tokenizer) for row in rows]
    out = Encoded([], [], fmt)
    for sample in samples:
        ex = encode(sample, tokenizer, fmt)
        if max_length is not None and len(ex["input_ids"]) > max_length:
            out.truncated += 1
            ex = {k: v[:max_length] for k, v in ex.items()}
        if all(t == IGNORE for t in ex["labels"]):
            out.dropped += 1
            continue
        out.examples.append(ex)
        out.samples.append(sample)
    if out.truncated:
        out.notes.append(f"{path}: truncated {out.truncated} of {len(rows)} rows to "
                         f"max_length={max_length} tokens")
    if out.dropped:
        out.notes.append(f"{path}: dropped {out.dropped} rows with no target tokens left")
    if not out.examples:
        raise DataError(f"{path}: no usable rows (every row lost its target tokens to "
                        f"max_length={max_length})")
    return out


def pack(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Concatenate whole examples, in order, into sequences of at most `max_length` tokens.

    Each packed sequence carries `position_ids` that restart at 0 for every example; the collator
    turns them into a block-diagonal causal mask, so attention does not cross examples. The first
    label of each example is masked, as in transformers' `DataCollatorWithFlattening`: the loss
    would otherwise predict it from the previous example's last token."""
    packed: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        n = len(ex["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + n > max_length:
            packed.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += ex["input_ids"]
        current["labels"] += [IGNORE] + ex["labels"][1:]
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        packed.append(current)
    return packed


class Collator:
    """Right-pads a batch: `input_ids` with the pad id, `labels` with -100, plus the attention
    mask: (B, T) for plain rows; for packed rows `position_ids` and a (B, 1, T, T) boolean
    block-diagonal causal mask."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ex["input_ids"]) for ex in batch)
        pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
        out = {
            "input_ids": torch.tensor([pad(ex["input_ids"], self.pad_id) for ex in batch]),
            "labels": torch.tensor([pad(ex["labels"], IGNORE) for ex in batch]),
        }
        if "position_ids" in batch[0]:
            out["position_ids"] = torch.tensor([pad(ex["position_ids"], 0) for ex in batch])
            out["attention_mask"] = packed_mask(batch, width)
        else:
            out["attention_mask"] = torch.tensor(
                [pad([1] * len(ex["input_ids"]), 0) for ex in batch])
        return out


def packed_mask(batch: list[dict[str, list[int]]], width: int) -> torch.Tensor:
    """(B, 1, T, T) bool: token i attends to j <= i of the same packed example; padding to
    nothing but itself (keeps softmax finite; its labels are ignored)."""
    masks = []
    for ex in batch:
        starts = torch.tensor([p == 0 for p in ex["position_ids"]], dtype=torch.long)
        seg = torch.cumsum(starts, 0)
        seg = torch.cat([seg, -1 - torch.arange(width - len(seg))])  # unique ids for padding
        same = seg[:, None] == seg[None, :]
        masks.append(same & torch.ones(width, width, dtype=torch.bool).tril())
    return torch.stack(masks)[:, None]
