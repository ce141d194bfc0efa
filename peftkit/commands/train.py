"""`peftkit train`: fine-tune a model on a data file with any method; see `peftkit.train.run`."""

from __future__ import annotations

from ..methods import registry
from ..train import options


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="fine-tune on a data file (LoRA by default)",
        description="Fine-tune with --method " + "|".join(registry.SPECS) + ". Options may "
        "come from a YAML --config (keys = flag names in snake_case); flags override it.")
    options.add_train_arguments(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..train.run import train

    train(options.resolve(args))
    return 0
