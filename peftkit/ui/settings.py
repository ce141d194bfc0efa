"""The page's settings form as command lines: `peftkit train`, `peftkit estimate --json` and
`peftkit doctor --json` arguments.

Settings are a dict keyed by `peftkit train` option names in snake_case (`FIELDS`), plus `name`
(the run's folder under the runs directory) and `extra` (more train flags, as typed). The train
command line is checked with peftkit's own parser, so a bad flag gets the CLI's error, and its
output folder must be `runs_dir/name`: the page writes nowhere else.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import threading

from ..errors import UserError

# Held while the CLI runs inside the server: it swaps stdout and stderr for the whole process.
CLI_LOCK = threading.Lock()

# Train options the form sets, in command-line order.
FIELDS = ("method", "model", "data", "eval_data", "eval_split", "test_data", "max_steps",
          "epochs", "batch_size", "grad_accum", "learning_rate", "max_length", "logging_steps",
          "save_steps", "r", "lora_alpha", "lora_dropout", "target_modules",
          "gradient_checkpointing", "overwrite", "resume")
LORA = ("r", "lora_alpha", "lora_dropout", "target_modules")  # estimate's own flags
DOCTOR = ("method", "model", "data", "r", "lora_alpha", "lora_dropout", "target_modules",
          "learning_rate", "batch_size", "grad_accum", "epochs", "max_steps", "max_length")
ESTIMATE_MODEL = "smollm2-135m"  # the planner's name of the embedded default model


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _given(settings: dict, name: str):
    value = settings.get(name)
    return None if value is None or value == "" or value is False else value


def _pairs(settings: dict, names) -> list[str]:
    out = []
    for name in names:
        value = _given(settings, name)
        if value is True:
            out.append(_flag(name))
        elif value is not None:
            out += [_flag(name), str(value)]
    return out


def extra_flags(settings: dict) -> list[str]:
    try:
        return shlex.split(settings.get("extra") or "")
    except ValueError as err:
        raise UserError(f"other flags: {err}") from None


def run_dir(runs_dir: str, name: str) -> str:
    """`runs_dir/name`, refusing names that leave the runs directory or hide the folder."""
    name = (name or "").strip()
    parts = name.replace("\\", "/").split("/")
    if not name or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise UserError(f"run name {name!r}: give a folder name such as lora-r8 (letters, digits, "
                        "-, _; no leading dot, no ..)")
    return os.path.join(runs_dir, *parts)


def train_argv(settings: dict, runs_dir: str) -> list[str]:
    """`peftkit train` arguments (after `peftkit`) for `settings`, checked by the CLI's parser."""
    out = run_dir(runs_dir, settings.get("name", ""))
    argv = ["train", *_pairs(settings, FIELDS), *extra_flags(settings)]
    if parse(argv).output_dir is not None:
        raise UserError("the output folder is the run name; remove --output-dir from the other "
                        "flags")
    return [*argv, "--output-dir", out]


def parse(argv: list[str]) -> argparse.Namespace:
    """`argv` parsed by peftkit's CLI parser; its error message becomes a UserError."""
    from ..cli import build_parser

    err = io.StringIO()
    try:
        with CLI_LOCK, contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        message = lines[-1] if lines else "bad flags"
        raise UserError(message.split(": error: ", 1)[-1]) from None


def estimate_argv(settings: dict) -> list[str]:
    """`peftkit estimate --json` arguments: the LoRA fields as its flags; the method's other
    flags among the other flags (`--name value`, or a bare `--name` for true) as
    `--option name=value`; fp32 unless the other flags say --bf16 or --fp16, as in training."""
    from ..methods.registry import all_flags

    method = _given(settings, "method") or "lora"
    argv = ["estimate", "--json", "--model", _given(settings, "model") or ESTIMATE_MODEL,
            "--method", method, *_pairs(settings, ("batch_size", "max_length",
                                                    "gradient_checkpointing"))]
    if method in ("lora", "qlora"):
        argv += _pairs(settings, LORA)
    method_flags = set(all_flags()) - set(LORA)
    dtype = "fp32"
    tokens = extra_flags(settings)
    for i, token in enumerate(tokens):
        name, _, value = token.removeprefix("--").replace("-", "_").partition("=")
        if not token.startswith("--"):
            continue
        if name in ("bf16", "fp16"):
            dtype = name
        elif name in method_flags:
            if not value:
                bare = i + 1 == len(tokens) or tokens[i + 1].startswith("--")
                value = "true" if bare else tokens[i + 1]
            argv += ["--option", f"{name}={value}"]
    return argv + ["--dtype", dtype]


def doctor_argv(settings: dict) -> list[str]:
    return ["doctor", "--json", *_pairs(settings, DOCTOR)]
