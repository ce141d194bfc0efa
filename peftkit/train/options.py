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
from ..methods import registry
from .inputs import read_text
from .ranges import csv_list, fraction, non_negative_float, non_negative_int, number, \
    positive_float, positive_int

REQUIRED = ("data", "output_dir")
REPORT_TO = ("none", "tensorboard", "wandb", "trackio")
DATA, TRAINING = "data", "training (transformers TrainingArguments)"
DISTRIBUTED = "more than one device (under torchrun)"
METHOD_GROUP = "method options (each applies to some methods only)"
_BOOLEAN = ("store_true", argparse.BooleanOptionalAction)


def _option(flag: str, default: Any = None, group: str | None = None, **kwargs) -> tuple:
    return flag[2:].replace("-", "_"), (flag, default, group, kwargs)


# dest -> (flag, built-in default, help group, argparse keywords); method options come from
# `methods.registry`.
OPTIONS: dict[str, tuple[str, Any, str | None, dict[str, Any]]] = dict([
    _option("--method", "lora", help=f"one of {', '.join(registry.SPECS)}"),
    _option("--model", help="model folder or hub id (default: embedded SmolLM2-135M-Instruct)"),
    _option("--data", group=DATA,
            help="training data: .jsonl, .json, .csv, .parquet or a datasets folder"),
    _option("--eval-data", group=DATA, help="evaluation data (same formats)"),
    _option("--eval-split", 0.0, DATA, type=fraction,
            help="hold out this fraction of --data for evaluation when there is no --eval-data"),
    _option("--test-data", group=DATA, help="held-out data: after training, exact match of "
            "greedy answers and loss go into run_summary.json"),
    _option("--forgetting", False, DATA, action="store_true",
            help="with --test-data, also measure forgetting: mean per-token KL(untouched || "
                 "trained) on the untouched model's answers to general questions "
                 "(train/forgetting.py)"),
    _option("--max-new-tokens", 64, DATA, type=positive_int, help="answer length for --test-data"),
    _option("--max-length", 512, DATA, type=positive_int, help="truncate rows to this many tokens"),
    _option("--packing", False, DATA, action="store_true",
            help="pack rows into --max-length sequences"),
    _option("--output-dir", group=TRAINING, help="where checkpoints, logs and the adapter go"),
    _option("--overwrite", False, TRAINING, action="store_true",
            help="write into an existing output dir"),
    _option("--resume", group=TRAINING, nargs="?", const=True, metavar="CHECKPOINT",
            help="continue from the last complete checkpoint in --output-dir (or from "
                 "CHECKPOINT)"),
    _option("--batch-size", 4, TRAINING, type=positive_int, help="per-device batch size"),
    _option("--eval-batch-size", group=TRAINING, type=positive_int,
            help="batch size of evaluation and --test-data (default: --batch-size)"),
    _option("--grad-accum", 4, TRAINING, type=positive_int, help="gradient accumulation steps"),
    _option("--epochs", 3.0, TRAINING, type=non_negative_float, help="training epochs"),
    _option("--max-steps", -1, TRAINING, type=number(int, -1),
            help="optimizer steps; overrides --epochs when > 0"),
    _option("--learning-rate", 2e-4, TRAINING, type=positive_float, help="peak learning rate"),
    _option("--weight-decay", 0.0, TRAINING, type=non_negative_float, help="AdamW weight decay"),
    _option("--warmup-steps", 0, TRAINING, type=non_negative_int, help="linear warm-up steps"),
    _option("--lr-scheduler", "linear", TRAINING, help="linear, cosine, constant, ..."),
    _option("--max-grad-norm", 1.0, TRAINING, type=non_negative_float,
            help="gradient clipping norm (0: no clipping)"),
    _option("--fp16", False, TRAINING, action="store_true", help="fp16 mixed precision (GPU)"),
    _option("--bf16", False, TRAINING, action="store_true", help="bf16 mixed precision"),
    _option("--dtype", "auto", TRAINING, choices=["auto", "float32", "bfloat16"],
            help="dtype of the base model's weights; auto: bfloat16 where the hardware computes "
                 "it natively (CUDA, or a CPU with amx_bf16/avx512_bf16), else float32"),
    _option("--gradient-checkpointing", False, TRAINING, action="store_true",
            help="recompute activations in the backward pass"),
    _option("--fused-loss", True, TRAINING, action=argparse.BooleanOptionalAction,
            help="training steps of a supported causal LM compute the loss chunk by chunk from "
                 "hidden states, never holding the (batch, length, vocab) logits; same loss as "
                 "transformers' (--no-fused-loss: theirs)"),
    _option("--seed", 42, TRAINING, type=number(int, 0, below=2**32),
            help="seed for initialization and data order"),
    _option("--logging-steps", 10, TRAINING, type=positive_int, help="log the loss every N steps"),
    _option("--eval-steps", group=TRAINING, type=positive_int,
            help="evaluate every N steps (default: each epoch)"),
    _option("--save-steps", group=TRAINING, type=positive_int,
            help="checkpoint every N steps (default: each epoch)"),
    _option("--save-total-limit", 2, TRAINING, type=positive_int, help="checkpoints kept"),
    _option("--report-to", "none", TRAINING, choices=list(REPORT_TO),
            help="send the training logs to this tracker too (its package must be installed)"),
    _option("--fsdp", False, DISTRIBUTED, action="store_true",
            help="shard the model over the torchrun processes with PyTorch FSDP2, one unit per "
                 "decoder layer (transformers' --fsdp full_shard); methods full, lora, qlora, "
                 "bottleneck"),
    _option("--fsdp-reshard-after-forward", True, DISTRIBUTED,
            action=argparse.BooleanOptionalAction,
            help="free each layer's gathered weights after its forward and gather them again "
                 "for backward (FULL_SHARD); --no-...: keep them until backward (SHARD_GRAD_OP)"),
    _option("--fsdp-cpu-offload", False, DISTRIBUTED, action="store_true",
            help="keep the sharded weights, gradients and optimizer states in CPU memory (GPU "
                 "only; accelerate's fsdp_offload_params)"),
    _option("--fsdp-transformer-layer-cls-to-wrap", group=DISTRIBUTED, type=csv_list,
            help="class names of the modules that become FSDP units (default: the model's "
                 "decoder layer, from its _no_split_modules)"),
    _option("--deepspeed", group=DISTRIBUTED,
            help="not supported (refused with an explanation): use --fsdp"),
])


def specs() -> dict[str, dict[str, Any]]:
    """Every `peftkit train` option (`--config` aside): dest -> argparse keywords (type, action,
    choices, help), the method options included."""
    return {**{dest: kwargs for dest, (_, _, _, kwargs) in OPTIONS.items()},
            **{name: {k: v for k, v in flag.items() if k != "default"}
               for name, flag in registry.all_flags().items()}}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Every option with default None, so that `resolve` sees which were given."""
    p.add_argument("--config", help="YAML file of options (keys = flag names in snake_case)")
    groups = {None: p}
    for dest, (flag, default, group, kwargs) in OPTIONS.items():
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        kwargs = dict(kwargs)
        if default not in (None, False) and "help" in kwargs:
            kwargs["help"] += f" (default: {default})"
        groups[group].add_argument(flag, dest=dest, default=None, **kwargs)
    add_method_arguments(p.add_argument_group(METHOD_GROUP))


def add_method_arguments(group) -> None:
    """Every method's flags, default None; the help names the methods each applies to."""
    for name, flag in registry.all_flags().items():
        kwargs = {k: v for k, v in flag.items() if k != "default"}
        kwargs["help"] = f"{kwargs['help']} [{', '.join(registry.users(name))}]"
        group.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **kwargs)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options not given on the command line from `--config`, then the defaults, and
    check them. Method flags stay `None` unless set, so `registry.resolve` can tell which were."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    from_file = load_yaml(args.config) if args.config else {}
    defaults = {dest: default for dest, (_, default, _, _) in OPTIONS.items()}
    merged = argparse.Namespace(**{**defaults, **{k: None for k in registry.all_flags()},
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
    if args.forgetting and not args.test_data:
        raise UserError("--forgetting is measured with the --test-data evaluation: give both")
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
    known = specs()
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise UserError(f"{path}: unknown option(s) {unknown}; valid keys: {sorted(known)}")
    typed = {}
    for key, value in data.items():
        if value is None:
            continue
        try:
            typed[key] = _typed(value, known[key])
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
    if parse is csv_list and isinstance(value, list):
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
    return {name: getattr(args, name) for name in registry.all_flags()}
