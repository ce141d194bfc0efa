"""`peftkit train` options: argparse flags, a YAML `--config` whose keys are the flag names in
snake_case, and command-line flags overriding the file.

Every flag is registered with default `None`, so after parsing "not given" is visible; `resolve`
then layers built-in defaults < YAML values < given flags.
"""

from __future__ import annotations

import argparse
from typing import Any

from . import methods

REQUIRED = ("data", "output_dir")
_DEFAULTS: dict[str, Any] = {}
_TYPES: dict[str, Any] = {}


def _add(group, flag: str, default: Any = None, **kwargs) -> None:
    dest = flag[2:].replace("-", "_")
    _DEFAULTS[dest] = default
    if "type" in kwargs:
        _TYPES[dest] = kwargs["type"]
    if default not in (None, False) and "help" in kwargs:
        kwargs["help"] += f" (default: {default})"
    group.add_argument(flag, dest=dest, default=None, **kwargs)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of options (keys = flag names in snake_case)")
    _add(p, "--method", "lora", help=f"one of {', '.join(methods.METHODS)}")
    _add(p, "--model", help="model folder or hub id (default: embedded SmolLM2-135M-Instruct)")
    d = p.add_argument_group("data")
    _add(d, "--data", help="training data: .jsonl, .json, .csv, .parquet or a datasets folder")
    _add(d, "--eval-data", help="evaluation data (same formats)")
    _add(d, "--eval-split", 0.0, type=float,
         help="hold out this fraction of --data for evaluation when there is no --eval-data")
    _add(d, "--test-data", help="held-out data: after training, exact match of greedy answers "
         "and loss go into run_summary.json")
    _add(d, "--max-new-tokens", 64, type=int, help="answer length for --test-data")
    _add(d, "--max-length", 512, type=int, help="truncate rows to this many tokens")
    _add(d, "--packing", False, action="store_true", help="pack rows into --max-length sequences")
    t = p.add_argument_group("training (transformers TrainingArguments)")
    _add(t, "--output-dir", help="where checkpoints, logs and the adapter go")
    _add(t, "--overwrite", False, action="store_true", help="write into an existing output dir")
    _add(t, "--resume", nargs="?", const=True, metavar="CHECKPOINT",
         help="continue from the last complete checkpoint in --output-dir (or from CHECKPOINT)")
    _add(t, "--batch-size", 4, type=int, help="per-device batch size")
    _add(t, "--eval-batch-size", type=int, help="batch size of evaluation and --test-data "
         "(default: --batch-size)")
    _add(t, "--grad-accum", 4, type=int, help="gradient accumulation steps")
    _add(t, "--epochs", 3.0, type=float, help="training epochs")
    _add(t, "--max-steps", -1, type=int, help="optimizer steps; overrides --epochs when > 0")
    _add(t, "--learning-rate", 2e-4, type=float, help="peak learning rate")
    _add(t, "--weight-decay", 0.0, type=float, help="AdamW weight decay")
    _add(t, "--warmup-steps", 0, type=int, help="linear warm-up steps")
    _add(t, "--lr-scheduler", "linear", help="linear, cosine, constant, ...")
    _add(t, "--max-grad-norm", 1.0, type=float, help="gradient clipping norm")
    _add(t, "--fp16", False, action="store_true", help="fp16 mixed precision (GPU)")
    _add(t, "--bf16", False, action="store_true", help="bf16 mixed precision")
    _add(t, "--gradient-checkpointing", False, action="store_true",
         help="recompute activations in the backward pass")
    _add(t, "--fused-loss", True, action=argparse.BooleanOptionalAction,
         help="training steps of a supported causal LM compute the loss chunk by chunk from "
              "hidden states, never holding the (batch, length, vocab) logits; same loss as "
              "transformers' (--no-fused-loss: theirs)")
    _add(t, "--seed", 42, type=int, help="seed for initialization and data order")
    _add(t, "--logging-steps", 10, type=int, help="log the loss every N steps")
    _add(t, "--eval-steps", type=int, help="evaluate every N steps (default: each epoch)")
    _add(t, "--save-steps", type=int, help="checkpoint every N steps (default: each epoch)")
    _add(t, "--save-total-limit", 2, type=int, help="checkpoints kept")
    m = p.add_argument_group("method options (each applies to some methods only)")
    for name, spec in methods.all_flags().items():
        kwargs = {k: v for k, v in spec.items() if k != "default"}
        m.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **kwargs)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options not given on the command line from `--config`, then the defaults.
    Method flags stay `None` unless set, so `methods.resolve` can tell which were set."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    from_file = load_yaml(args.config) if args.config else {}
    merged = {**_DEFAULTS, **{k: None for k in methods.all_flags()}, **from_file, **given}
    return argparse.Namespace(**merged)


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    known = set(_DEFAULTS) | set(methods.all_flags())
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {unknown}; valid keys: {sorted(known)}")
    types = {**_TYPES, **{k: f["type"] for k, f in methods.all_flags().items() if "type" in f}}
    for key, value in data.items():
        if key in types and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            try:
                data[key] = types[key](value if types[key] is not float else str(value))
            except ValueError:
                raise ValueError(f"{path}: {key}={value!r} is not a valid value") from None
    return data


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in methods.all_flags()}
