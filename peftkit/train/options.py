"""`peftkit train` options: argparse flags, a YAML `--config` whose keys are the flag names in
snake_case, and command-line flags overriding the file.

Every flag is registered with default `None`, so after parsing "not given" is visible; `resolve`
then layers built-in defaults < YAML values < given flags and checks the result. A YAML value is
typed like its flag: a boolean flag takes a YAML boolean only, a number goes through the flag's
range-checked type (`ranges`), a choice must be one of the flag's choices.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import UserError, require
from . import methods
from .inputs import read_text
from .ranges import fraction, non_negative_float, non_negative_int, number, positive_float, \
    positive_int

REQUIRED = ("data", "output_dir")
REPORT_TO = ("none", "tensorboard", "wandb", "trackio")
_DEFAULTS: dict[str, Any] = {}
_SPECS: dict[str, dict[str, Any]] = {}  # dest -> the argparse keywords (type, action, choices)
_BOOLEAN = ("store_true", argparse.BooleanOptionalAction)


def _add(group, flag: str, default: Any = None, **kwargs) -> None:
    dest = flag[2:].replace("-", "_")
    _DEFAULTS[dest] = default
    _SPECS[dest] = kwargs
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
    _add(d, "--eval-split", 0.0, type=fraction,
         help="hold out this fraction of --data for evaluation when there is no --eval-data")
    _add(d, "--test-data", help="held-out data: after training, exact match of greedy answers "
         "and loss go into run_summary.json")
    _add(d, "--max-new-tokens", 64, type=positive_int, help="answer length for --test-data")
    _add(d, "--max-length", 512, type=positive_int, help="truncate rows to this many tokens")
    _add(d, "--packing", False, action="store_true", help="pack rows into --max-length sequences")
    t = p.add_argument_group("training (transformers TrainingArguments)")
    _add(t, "--output-dir", help="where checkpoints, logs and the adapter go")
    _add(t, "--overwrite", False, action="store_true", help="write into an existing output dir")
    _add(t, "--resume", nargs="?", const=True, metavar="CHECKPOINT",
         help="continue from the last complete checkpoint in --output-dir (or from CHECKPOINT)")
    _add(t, "--batch-size", 4, type=positive_int, help="per-device batch size")
    _add(t, "--eval-batch-size", type=positive_int, help="batch size of evaluation and "
         "--test-data (default: --batch-size)")
    _add(t, "--grad-accum", 4, type=positive_int, help="gradient accumulation steps")
    _add(t, "--epochs", 3.0, type=non_negative_float, help="training epochs")
    _add(t, "--max-steps", -1, type=number(int, -1),
         help="optimizer steps; overrides --epochs when > 0")
    _add(t, "--learning-rate", 2e-4, type=positive_float, help="peak learning rate")
    _add(t, "--weight-decay", 0.0, type=non_negative_float, help="AdamW weight decay")
    _add(t, "--warmup-steps", 0, type=non_negative_int, help="linear warm-up steps")
    _add(t, "--lr-scheduler", "linear", help="linear, cosine, constant, ...")
    _add(t, "--max-grad-norm", 1.0, type=non_negative_float,
         help="gradient clipping norm (0: no clipping)")
    _add(t, "--fp16", False, action="store_true", help="fp16 mixed precision (GPU)")
    _add(t, "--bf16", False, action="store_true", help="bf16 mixed precision")
    _add(t, "--dtype", "auto", choices=["auto", "float32", "bfloat16"],
         help="dtype of the base model's weights; auto: bfloat16 where the hardware computes it "
              "natively (CUDA, or a CPU with amx_bf16/avx512_bf16), else float32")
    _add(t, "--gradient-checkpointing", False, action="store_true",
         help="recompute activations in the backward pass")
    _add(t, "--fused-loss", True, action=argparse.BooleanOptionalAction,
         help="training steps of a supported causal LM compute the loss chunk by chunk from "
              "hidden states, never holding the (batch, length, vocab) logits; same loss as "
              "transformers' (--no-fused-loss: theirs)")
    _add(t, "--seed", 42, type=number(int, 0, below=2**32),
         help="seed for initialization and data order")
    _add(t, "--logging-steps", 10, type=positive_int, help="log the loss every N steps")
    _add(t, "--eval-steps", type=positive_int, help="evaluate every N steps (default: each epoch)")
    _add(t, "--save-steps", type=positive_int,
         help="checkpoint every N steps (default: each epoch)")
    _add(t, "--save-total-limit", 2, type=positive_int, help="checkpoints kept")
    _add(t, "--report-to", "none", choices=list(REPORT_TO),
         help="send the training logs to this tracker too (its package must be installed)")
    m = p.add_argument_group("method options (each applies to some methods only)")
    for name, spec in methods.all_flags().items():
        kwargs = {k: v for k, v in spec.items() if k != "default"}
        m.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **kwargs)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options not given on the command line from `--config`, then the defaults, and
    check them. Method flags stay `None` unless set, so `methods.resolve` can tell which were."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    from_file = load_yaml(args.config) if args.config else {}
    merged = argparse.Namespace(**{**_DEFAULTS, **{k: None for k in methods.all_flags()},
                                   **from_file, **given})
    check(merged)
    return merged


def check(args: argparse.Namespace) -> None:
    """Refuse option combinations that cannot train (each value alone passed its flag's type)."""
    from transformers import SchedulerType

    for name in REQUIRED:
        if not getattr(args, name):
            raise UserError(f"--{name.replace('_', '-')} is required (flag or --config key)")
    if args.max_steps == 0:
        raise UserError("--max-steps 0 trains nothing: give a number of optimizer steps, or -1 "
                        "(the default) to train for --epochs")
    if args.max_steps == -1 and args.epochs == 0:
        raise UserError("--epochs 0 trains nothing: give --epochs > 0 or --max-steps N")
    schedulers = [s.value for s in SchedulerType]
    if args.lr_scheduler not in schedulers:
        raise UserError(f"--lr-scheduler {args.lr_scheduler!r} is not one of "
                        f"{', '.join(schedulers)}")


def load_yaml(path: str) -> dict[str, Any]:
    """The options in YAML file `path`, typed and range-checked like the flags; a key with no
    value counts as not given."""
    yaml = require("yaml", "train", "--config (a YAML file)")
    text = read_text(path, "--config")
    try:
        data, root = yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        problem = getattr(err, "problem", None) or err
        raise UserError(f"{where}: not valid YAML ({problem}); write one `option: value` per "
                        "line") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected `option: value` lines (a YAML mapping), got a "
                        f"{type(data).__name__}")
    lines = {str(key.value).replace("-", "_"): key.start_mark.line + 1 for key, _ in root.value}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    specs = {**_SPECS, **methods.all_flags()}
    unknown = sorted(set(data) - set(specs))
    if unknown:
        raise UserError(f"{path}: unknown option(s) {unknown}; valid keys: {sorted(specs)}")
    typed = {}
    for key, value in data.items():
        if value is None:
            continue
        try:
            typed[key] = _typed(value, specs[key])
        except argparse.ArgumentTypeError as err:
            raise UserError(f"{path}:{lines.get(key, '?')}: {key}: {err}") from None
    return typed


def _typed(value: Any, spec: dict[str, Any]) -> Any:
    """`value` read from YAML, as the flag described by `spec` (argparse keywords) takes it."""
    if spec.get("action") in _BOOLEAN:
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"expected true or false (unquoted), got {value!r}")
        return value
    if spec.get("const") is True and isinstance(value, bool):  # --resume [CHECKPOINT]
        return value or None
    parse = spec.get("type")
    numeric = getattr(parse, "__name__", None) in ("int", "float")  # a `ranges.number` parser
    if parse is methods.csv_list and isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise argparse.ArgumentTypeError(f"expected a list of names, got {value!r}")
    elif numeric or isinstance(value, str):
        value = parse(value) if parse else value
    else:
        raise argparse.ArgumentTypeError(f"expected a string, got {value!r}")
    if "choices" in spec and value not in spec["choices"]:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(spec['choices'])}, got "
                                         f"{value!r}")
    return value


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in methods.all_flags()}
