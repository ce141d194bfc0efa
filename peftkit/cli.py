"""`peftkit <command> ...`: the command-line entry point.

Each command lives in its own module under `peftkit/commands/` and exposes
`register(subparsers)`, which adds its parser and sets `func(args) -> int`. Heavy imports (torch,
transformers) happen inside the commands, so `peftkit --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("train", "eval", "generate", "chat", "merge", "task", "compare", "sweep", "estimate",
            "doctor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftkit", description="Parameter-efficient fine-tuning of language models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"peftkit.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line as given, for the records commands write
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
