"""`peftkit <command> ...`: the command-line entry point.

Each command lives in its own module under `peftkit/commands/` and exposes
`register(subparsers)`, which adds its parser and sets `func(args) -> int`. Heavy imports (torch,
transformers) happen inside the commands, so `peftkit --help` is instant.

A user's mistake never ends in a traceback: `main` prints a `UserError` (and the errors libraries
raise for bad input, below) as `peftkit <command>: error: <message>` and returns 2, as argparse
does for a bad flag. `--debug` lets the exception through with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

COMMANDS = ("train", "eval", "generate", "chat", "merge", "task", "compare", "sweep", "estimate",
            "doctor", "export", "ui")


def _input_errors() -> tuple[type[BaseException], ...]:
    """What peftkit's validation (ValueError, NotImplementedError), file access and
    transformers' loading (OSError) and safetensors raise for bad input, besides UserError."""
    from safetensors import SafetensorError

    return UserError, ValueError, NotImplementedError, OSError, SafetensorError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftkit", description="Parameter-efficient fine-tuning of language models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"peftkit.commands.{name}").register(sub)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true",
                             help="show the traceback of an error instead of a message")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line as given, for the records commands write
    try:
        return args.func(args) or 0
    except _input_errors() as err:
        if args.debug:
            raise
        origin = "" if isinstance(err, UserError) else (
            f" ({type(err).__name__}; --debug shows where it was raised)")
        print(f"peftkit {args.command}: error: {err}{origin}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
