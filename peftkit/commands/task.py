"""`peftkit task`: list the generated tasks, or write one's train/test files."""

from __future__ import annotations

import random


def register(subparsers) -> None:
    p = subparsers.add_parser("task", help="write a generated task's train.jsonl and test.jsonl")
    p.add_argument("name", nargs="?", help="task name (see --list)")
    p.add_argument("--list", action="store_true", help="list the tasks")
    p.add_argument("--out", help="folder for train.jsonl and test.jsonl (default: the name)")
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from .. import tasks

    if args.list or not args.name:
        for task in tasks.TASKS.values():
            question, answer = task.example(random.Random(0))
            print(f"{task.name:14s} {task.description}\n{'':14s} e.g. {question!r} -> {answer!r}")
        return 0
    for path in tasks.write(args.name, args.out or args.name, args.n_train, args.n_test,
                            args.seed):
        print(path)
    return 0
