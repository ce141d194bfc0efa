"""`peftkit compare`: methods and named presets (LoRA variants: `experiments.variants`) on one task
and budget, each run once per seed in its own process (seed by seed, so an interrupted
compare holds whole rounds), plus the untouched model (zero-shot); see
`peftkit.experiments`.
"""

from __future__ import annotations

from ..experiments import options, variants


def register(subparsers) -> None:
    presets = "; ".join(f"{v.name} = {v.method} {_flag_text(v.flags)}"
                        for v in variants.PRESETS.values())
    p = subparsers.add_parser(
        "compare", help="train methods side by side on one task, over seeds; table and plots",
        description="Train each method on the same task, data, steps and batch, once per seed, "
        "each run in its own process; measure trainable parameters, peak training memory, "
        "training time, exact match, eval loss and forgetting (mean per-token KL from the "
        "untouched model on its own answers to general questions); write results.json (every "
        "run, and each method's mean and 95% t interval), results.md and plots to --out. "
        f"Presets: {presets}.")
    p.add_argument("--methods", default=",".join(variants.default_names()),
                   help="comma-separated methods and presets (default: every one this peftkit "
                        "train supports: %(default)s)")
    options.add_arguments(p)
    p.set_defaults(func=_run)


def _flag_text(flags: dict) -> str:
    return " ".join("--" + k.replace("_", "-") + ("" if v is True else f" {v}")
                    for k, v in flags.items())


def _run(args) -> int:
    from ..experiments.experiment import run_experiment
    from ..experiments.runs import ZERO_SHOT, Run

    chosen = [variants.get(m.strip(), "--methods") for m in args.methods.split(",") if m.strip()]
    extra = options.overrides(args)
    setup = options.setup(args)
    runs = [Run(ZERO_SHOT, ZERO_SHOT)] + [Run(v.name, v.method, variants.flags(v, extra), seed)
                                         for seed in args.seeds for v in chosen]
    reference = "full" if any(v.name == "full" for v in chosen) else None
    results = run_experiment(runs, setup, args.out, reference, options.command(args.argv),
                             args.resume)
    return 0 if all(r["status"] == "ok" for r in results["runs"]) else 1
