"""Typed, range-checked option values: argparse `type=` functions that the YAML `--config`
reader applies too, so a value is checked the same way wherever it comes from."""

from __future__ import annotations

import argparse
import math
import operator
from typing import Callable

_COMPARE = {">=": operator.ge, ">": operator.gt, "<": operator.lt}


def number(kind: type, low: float | None = None, *, above: float | None = None,
           below: float | None = None) -> Callable[[object], int | float]:
    """A parser of `kind` (int or float) values with `low <= value`, `above < value` and
    `value < below` (each bound optional). It takes command-line text or a YAML number; a
    float for an int (8.7), a boolean or a non-finite value is refused."""
    noun = "an integer" if kind is int else "a number"
    limits = {op: v for op, v in zip(_COMPARE, (low, above, below)) if v is not None}

    def parse(value: object) -> int | float:
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise argparse.ArgumentTypeError(f"expected {noun}, got {value!r}")
        try:
            out = kind(value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {noun}, got {value!r}") from None
        if not math.isfinite(out) or not all(_COMPARE[op](out, v) for op, v in limits.items()):
            wanted = " and ".join(f"{op} {v:g}" for op, v in limits.items())
            raise argparse.ArgumentTypeError(f"must be {wanted or 'finite'}, got {value!r}")
        return out

    parse.__name__ = kind.__name__
    parse.kind = kind  # the plain type, for readers that explain a bad value instead (doctor)
    return parse


positive_int = number(int, 1)
non_negative_int = number(int, 0)
positive_float = number(float, above=0)
non_negative_float = number(float, 0)
fraction = number(float, 0, below=1)  # a dropout probability or a held-out share


def csv_list(text: str) -> list[str] | str:
    """`q_proj,v_proj` -> a list; `all-linear` stays a string (PEFT's keyword)."""
    return text if text == "all-linear" else [t.strip() for t in text.split(",") if t.strip()]
