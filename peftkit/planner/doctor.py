"""Best-practice checks of a training configuration and its data (`peftkit doctor`).

The rules of thumb come from the LoRA literature and common practice (Hu et al., 2021; Dettmers
et al., 2023; PEFT's docs): r between 8 and 32 (64 at most), alpha = 2r, lr 1e-4 to 2e-4 for LoRA,
q_proj and v_proj first (attention projections), embed_tokens and lm_head usually not. The
pitfalls checked: rank too low, wrong modules, learning rate too small, unbalanced data.
Each `Finding` carries a severity (error > warning > info), the reason and the fix. `peftkit
train` runs `check_config` and `check_data` at start and prints the findings as warnings.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import difflib
import json
import os
import statistics

SEVERITIES = ("error", "warning", "info")
# `peftkit train` flags (issue 5) as YAML keys; dashed spellings are accepted too.
TRAIN_KEYS = ("method", "model", "data", "eval_data", "config", "r", "lora_alpha", "lora_dropout",
              "target_modules", "learning_rate", "batch_size", "grad_accum", "epochs", "max_steps",
              "max_length", "warmup_steps", "lr_scheduler", "fp16", "bf16", "seed", "output_dir",
              "logging_steps", "eval_steps", "save_steps", "packing", "resume", "overwrite")
LORA_METHODS = ("lora", "qlora")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "query", "key", "value",
             "query_key_value", "qkv_proj", "Wqkv")
MIN_ROWS = 100


@dataclasses.dataclass
class Finding:
    severity: str  # error | warning | info
    check: str
    reason: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.severity}] {self.check}: {self.reason} Fix: {self.fix}"


def normalize(config: dict) -> dict:
    """Keys with dashes become snake_case (`--lora-alpha` / `lora-alpha` -> `lora_alpha`)."""
    return {str(k).lstrip("-").replace("-", "_"): v for k, v in config.items()}


def _targets(value) -> list[str] | str:
    if isinstance(value, str) and value != "all-linear":
        return [t.strip() for t in value.split(",") if t.strip()]
    return value


def check_config(config: dict) -> list[Finding]:
    """Findings for a `peftkit train` configuration (YAML keys or flags, see `TRAIN_KEYS`)."""
    cfg = normalize(config)
    out: list[Finding] = []
    for key in sorted(set(cfg) - set(TRAIN_KEYS)):
        close = difflib.get_close_matches(key, TRAIN_KEYS, n=1)
        out.append(Finding("warning", "unknown-key", f"`{key}` is not a `peftkit train` option.",
                           f"rename it to `{close[0]}`." if close else "remove it."))
    method = cfg.get("method", "lora")
    if method not in LORA_METHODS:
        return out
    r = cfg.get("r", 8)
    if isinstance(r, int) and r < 8:
        out.append(Finding("warning", "rank-low", f"r={r} is below 8: the update may be too "
                           "low-rank to learn the task.", "use r between 8 and 32."))
    if isinstance(r, int) and r > 64:
        out.append(Finding("warning", "rank-high", f"r={r} is above 64: more memory and "
                           "overfitting risk for little gain.", "use r between 8 and 32."))
    alpha = cfg.get("lora_alpha")
    if isinstance(r, int) and alpha is not None and alpha != 2 * r:
        out.append(Finding("info", "alpha", f"lora_alpha={alpha} is not 2r={2 * r}; the update "
                           f"is scaled by alpha/r={alpha / r:g}.",
                           f"set lora_alpha={2 * r} unless you tuned it."))
    lr = cfg.get("learning_rate")
    if lr is not None and float(lr) < 1e-4:
        out.append(Finding("warning", "lr-low", f"learning_rate={lr} is below 1e-4: LoRA learns "
                           "slowly at full fine-tuning rates.", "use 1e-4 to 2e-4."))
    if lr is not None and float(lr) > 1e-3:
        out.append(Finding("warning", "lr-high", f"learning_rate={lr} is above 1e-3: training "
                           "may diverge.", "use 1e-4 to 2e-4."))
    tm = _targets(cfg.get("target_modules"))
    if isinstance(tm, list):
        leaves = {t.rsplit(".", 1)[-1] for t in tm}
        for bad in ("embed_tokens", "lm_head"):
            if bad in leaves:
                out.append(Finding("warning", "targets-embeddings", f"target_modules has {bad}: "
                                   "large, rarely helps, and changes the vocabulary layers.",
                                   f"drop {bad} (use modules_to_save if you added tokens)."))
        if not leaves & set(ATTENTION):
            out.append(Finding("warning", "no-attention", f"target_modules={tm} has no attention "
                               "projection.", "target q_proj and v_proj first (or all-linear)."))
    dropout = cfg.get("lora_dropout")
    if dropout is not None and not 0 <= float(dropout) < 1:
        out.append(Finding("error", "dropout", f"lora_dropout={dropout} is outside [0, 1).",
                           "use 0 to 0.1."))
    elif dropout is not None and float(dropout) > 0.3:
        out.append(Finding("warning", "dropout", f"lora_dropout={dropout} is above 0.3: the "
                           "adapter sees too little signal.", "use 0 to 0.1."))
    return out


def read_rows(path: str) -> list[dict]:
    """Rows of a JSONL, JSON (list) or CSV file."""
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        if path.endswith(".csv"):
            return list(csv.DictReader(fh))
        if path.endswith(".json"):
            rows = json.load(fh)
            return rows if isinstance(rows, list) else rows.get("data", [])
        rows = []
        for i, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{i}: not valid JSON ({err})") from None
        return rows


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
