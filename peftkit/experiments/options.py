"""The flags `peftkit compare` and `peftkit sweep` share: the task (a generated one, or the
user's files), the model, the budget every run gets, the seeds, and per-method overrides of the
seed's settings (`--lr lora=2e-4`, `--set dora.r=8`; a base method's override applies to its
presets too, see `variants`)."""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
from typing import Any

from .. import tasks
from ..methods import registry
from . import variants
from .runs import Setup

MAX_SEED_COUNT = 10  # a larger count is a list: "1,2,...,12"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for results, tables, plots and runs")
    t = p.add_argument_group("task")
    t.add_argument("--task", default="ledger", help=f"generated task: {', '.join(tasks.TASKS)}")
    t.add_argument("--data", help="your training file instead (any `peftkit train` format)")
    t.add_argument("--test-data", help="your held-out file, with --data")
    t.add_argument("--n-train", type=int, default=400, help="generated training rows")
    t.add_argument("--n-test", type=int, default=100, help="generated test rows")
    b = p.add_argument_group("model and budget (the same for every run)")
    b.add_argument("--model", help="model folder or hub id (default: embedded SmolLM2)")
    b.add_argument("--max-steps", type=int, default=40, help="optimizer steps (default: 40)")
    b.add_argument("--batch-size", type=int, default=8, help="rows per step (default: 8)")
    b.add_argument("--grad-accum", type=int, default=1, help="accumulation steps (default: 1)")
    b.add_argument("--max-length", type=int, default=256, help="tokens per row (default: 256)")
    b.add_argument("--seeds", type=seed_list, default=[1], metavar="N|S1,S2,...",
                   help=f"train every method once per seed: N (up to {MAX_SEED_COUNT}) means seeds "
                        "1..N, a list names them, one seed is S, (trailing comma; default: 1); "
                        "results give each method's mean and 95%% interval")
    b.add_argument("--max-new-tokens", type=int,
                   help="answer length at evaluation (default: the task's, 64 for --data)")
    o = p.add_argument_group("per-method settings")
    o.add_argument("--lr", default="", metavar="METHOD=LR,...",
                   help="learning rates, e.g. full=2e-5,lora=2e-4 (defaults: " +
                   ", ".join(f"{m}={s.learning_rate:g}" for m, s in registry.SPECS.items())
                   + "; a preset such as dora takes its base method's)")
    o.add_argument("--set", action="append", default=[], metavar="METHOD.OPTION=VALUE",
                   help="any `peftkit train` option of a method or preset, e.g. lora.r=8 "
                        "(lora and its presets) or dora.r=8 (dora only) or "
                        "prompt.num_virtual_tokens=50 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs a previous invocation finished with the same setup")


def setup(args: argparse.Namespace) -> Setup:
    """The shared setup; a generated task's files are written under `--out/data/`."""
    budget = dict(model=args.model, max_steps=args.max_steps, batch_size=args.batch_size,
                  grad_accum=args.grad_accum, max_length=args.max_length)
    if args.data or args.test_data:
        if not (args.data and args.test_data):
            raise ValueError("--data and --test-data go together: the test file is where exact "
                             "match is measured")
        for path in (args.data, args.test_data):
            if not os.path.exists(path):
                raise FileNotFoundError(f"no such data file: {path}")
        return Setup(args.data, args.test_data, "custom", _digest(args.data, args.test_data),
                     **budget, max_new_tokens=args.max_new_tokens or 64)
    task = tasks.get(args.task)
    train, test = tasks.write(task.name, os.path.join(args.out, "data", task.name),
                              args.n_train, args.n_test)
    return Setup(train, test, task.name, _digest(train, test), **budget,
                 max_new_tokens=args.max_new_tokens or task.max_new_tokens)


def seed_list(text: str) -> list[int]:
    """`--seeds`: "3" -> [1, 2, 3]; "7,8" -> [7, 8] (a single seed S: "S,")."""
    try:
        seeds = (list(range(1, int(text) + 1)) if "," not in text
                 else [int(s) for s in text.split(",") if s.strip()])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a count or comma-separated seeds") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: distinct seeds >= 0, at least one")
    if "," not in text and len(seeds) > MAX_SEED_COUNT:  # most likely meant as one seed
        raise argparse.ArgumentTypeError(
            f"{text!r} would train every method {len(seeds)} times (seeds 1..{len(seeds)}); "
            f"for seed {text} alone write --seeds {text},; counts go up to {MAX_SEED_COUNT}")
    return seeds


def _digest(*paths: str) -> str:
    """sha256 over the files' bytes (a folder: its files, in name order)."""
    digest = hashlib.sha256()
    for path in paths:
        files = [path] if not os.path.isdir(path) else [
            os.path.join(d, f) for d, _, names in sorted(os.walk(path)) for f in sorted(names)]
        for name in files:
            with open(name, "rb") as fh:
                digest.update(fh.read())
    return digest.hexdigest()


def parse_value(text: str) -> Any:
    """A --set / --values string as the JSON records show it: bool, int, float or str."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """method -> {option: value} from --lr and --set."""
    out: dict[str, dict[str, Any]] = {}
    for item in filter(None, (s.strip() for s in args.lr.split(","))):
        method, _, value = item.partition("=")
        variants.get(method, "--lr " + item)
        out.setdefault(method, {})["learning_rate"] = float(value)
    for item in args.set:
        key, eq, value = item.partition("=")
        method, dot, option = key.partition(".")
        if not (eq and dot and option):
            raise ValueError(f"--set {item!r}: expected METHOD.OPTION=VALUE, e.g. lora.r=8")
        variants.get(method, "--set " + item)
        out.setdefault(method, {})[option.replace("-", "_")] = parse_value(value)
    return out


def command(argv: list[str]) -> str:
    return shlex.join(["peftkit", *argv])
