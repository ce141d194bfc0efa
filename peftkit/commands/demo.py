"""`peftkit demo`: the seed's LoRA recipe end to end on the embedded model (see peftkit.demo)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="LoRA on the embedded SmolLM2: train, generate, save, merge")
    p.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    p.add_argument("--output-dir", default="runs/demo", help="where the adapter is saved")
    p.set_defaults(func=run)


def run(args) -> int:
    from peftkit.demo import run_demo

    return run_demo(steps=args.steps, output_dir=args.output_dir)
