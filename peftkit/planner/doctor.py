"""Best-practice checks of a training configuration and its data (`peftkit doctor`).

A configuration is a dict of `peftkit train` options (YAML keys or flags). The doctor names keys
that are no `peftkit train` option, an unknown method and options that do not apply to the method,
then runs the method's own rules of thumb (`MethodSpec.checks`, e.g. LoRA's rank, alpha, learning
rate and targets). The data checks cover size, duplicates, unbalanced targets and lengths, and
truncation. Each `Finding` carries a severity (error > warning > info), the reason and the fix.
`peftkit train` does not run these checks; `peftkit doctor` does.
"""

from __future__ import annotations

import collections
import difflib
import json
import statistics

from ..methods import registry
from ..methods.spec import Finding
from ..train import options
from ..train.rows import read_rows

SEVERITIES = ("error", "warning", "info")
MIN_ROWS = 100


def normalize(config: dict) -> dict:
    """Keys with dashes become snake_case (`--lora-alpha` / `lora-alpha` -> `lora_alpha`)."""
    return {str(k).lstrip("-").replace("-", "_"): v for k, v in config.items()}


def check_config(config: dict) -> list[Finding]:
    """Findings for a `peftkit train` configuration (see the module docstring)."""
    cfg = normalize(config)
    known = ["config", *options.specs()]
    out: list[Finding] = []
    for key in sorted(set(cfg) - set(known)):
        close = difflib.get_close_matches(key, known, n=1)
        out.append(Finding("warning", "unknown-key", f"`{key}` is not a `peftkit train` option.",
                           f"rename it to `{close[0]}`." if close else "remove it."))
    method = cfg.get("method", options.OPTIONS["method"][1])
    if method not in registry.SPECS:
        return out + [Finding("error", "unknown-method", f"method `{method}` is not known.",
                              f"use one of {', '.join(registry.SPECS)}.")]
    spec = registry.SPECS[method]
    for key in sorted(set(cfg) & set(registry.all_flags()) - set(spec.flags)):
        out.append(Finding("error", "not-for-method", f"`{key}` does not apply to method "
                           f"`{method}`; `peftkit train` refuses it.", "remove it, or use one of "
                           f"the methods it applies to: {', '.join(registry.users(key))}."))
    return out + (spec.checks(cfg) if spec.checks else [])


def data_rows(path: str) -> list[dict]:
    """The rows of a data file, read as `peftkit train` reads them (`train.rows`)."""
    return [row.data for row in read_rows(path)]


def split(row: dict) -> tuple[str, str]:
    """(prompt text, target text) of a prompt/completion, chat or Alpaca row."""
    if "messages" in row:
        msgs = row["messages"]
        target = " ".join(m.get("content", "") for m in msgs if m.get("role") == "assistant")
        prompt = " ".join(m.get("content", "") for m in msgs if m.get("role") != "assistant")
        return prompt, target
    if "instruction" in row:
        return f"{row['instruction']} {row.get('input', '')}".strip(), str(row.get("output", ""))
    return str(row.get("prompt", "")), str(row.get("completion", ""))


def check_data(rows: list[dict], max_length: int | None = None, count_tokens=None) -> list[Finding]:
    """Findings on the data: size, duplicates, unbalanced targets and lengths, truncation.

    `count_tokens(text) -> int` is the tokenizer's count; without one, tokens are estimated as
    characters / 4 (a rough English average) and the finding says so.
    """
    out: list[Finding] = []
    n = len(rows)
    if n < MIN_ROWS:
        out.append(Finding("warning", "data-small", f"{n} rows: too few to learn from without "
                           "overfitting.", f"collect at least {MIN_ROWS} examples, or train fewer "
                           "steps and watch eval loss."))
    if n == 0:
        return out
    keys = [json.dumps(r, sort_keys=True) for r in rows]
    dups = n - len(set(keys))
    if dups:
        out.append(Finding("warning", "data-duplicates", f"{dups} of {n} rows "
                           f"({100 * dups / n:.1f}%) are exact duplicates.",
                           "deduplicate: duplicates overweight some examples and leak into eval."))
    pairs = [split(r) for r in rows]
    targets = collections.Counter(t.strip() for _, t in pairs)
    top, count = targets.most_common(1)[0]
    if len(targets) <= max(20, n // 20) and count / n > 0.5 and len(targets) > 1:
        out.append(Finding("warning", "data-unbalanced", f"{count} of {n} rows ({100 * count / n:.0f}%) "
                           f"have the same target {top[:40]!r}: the model can score by always "
                           "answering it.", "balance the labels (resample or reweight)."))
    exact = count_tokens is not None
    count_tokens = count_tokens or (lambda text: -(-len(text) // 4))
    lengths = [count_tokens(p + " " + t) for p, t in pairs]
    median = statistics.median(lengths)
    if median and max(lengths) > 8 * median:
        out.append(Finding("info", "data-lengths", f"lengths are unbalanced: median {median:g}, "
                           f"longest {max(lengths)} tokens{'' if exact else ' (chars/4)'}.",
                           "use packing or group by length to avoid padding waste."))
    if max_length:
        cut = sum(length > max_length for length in lengths)
        if cut / n > 0.05:
            out.append(Finding("warning", "max-length", f"max_length={max_length} cuts {cut} of "
                               f"{n} rows ({100 * cut / n:.0f}%)"
                               f"{'' if exact else ', counting 4 characters per token'}.",
                               f"raise max_length to about {sorted(lengths)[int(0.95 * n)]} "
                               "or shorten the rows."))
    return out
