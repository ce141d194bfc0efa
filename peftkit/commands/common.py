"""Helpers the commands share: model/adapter flags and turning user errors into messages."""

from __future__ import annotations

import argparse
import functools
import sys

from ..train.rows import DataError


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", help="adapter folder (PEFT layout); omit to use the model alone")
    p.add_argument("--model", help="base or merged model folder / hub id (default: the "
                                   "adapter's base model, else the embedded SmolLM2)")


def user_errors(func):
    """Run `func(args)`; a bad-input error prints `peftkit <cmd>: error: ...` and returns 2."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args) or 0
        except (DataError, ValueError, FileNotFoundError, NotImplementedError) as err:
            print(f"peftkit {args.command}: error: {err}", file=sys.stderr)
            return 2

    return run
