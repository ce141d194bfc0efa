"""`peftkit compare`: every registered method (full fine-tuning, LoRA, QLoRA, bottleneck adapters,
prompt tuning, (IA)^3) on one task and budget, each in its own process, plus the untouched model
(zero-shot); see `peftkit.experiments`.
"""

from __future__ import annotations

from ..experiments import options
from ..methods import registry


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="train every method side by side on one task; table and plots",
        description="Train each method on the same task, data, steps, batch and seed, each in "
        "its own process; measure trainable parameters, peak training memory, training time, "
        "exact match and eval loss; write results.json, results.md and plots to --out.")
    p.add_argument("--methods", default=",".join(registry.SPECS),
                   help="comma-separated methods (default: all)")
    options.add_arguments(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..experiments.experiment import run_experiment
    from ..experiments.runs import ZERO_SHOT, Run

    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in chosen:
        options.method_name(method, "--methods")
    extra = options.overrides(args)
    setup = options.setup(args)
    runs = [Run(ZERO_SHOT, ZERO_SHOT)] + [Run(m, m, options.flags(m, extra)) for m in chosen]
    results = run_experiment(runs, setup, args.out, "full" if "full" in chosen else None,
                             options.command(args.argv), args.resume)
    return 0 if all(r["status"] == "ok" for r in results["runs"]) else 1
