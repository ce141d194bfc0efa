"""`peftkit sweep`: one method, one option over several values (the seed's rank table:
`--param r --values 4,8,16,32,64`), measured like `peftkit compare`, against full fine-tuning."""

from __future__ import annotations

import json

from ..experiments import options, variants

BUDGET = ("max_steps", "batch_size", "grad_accum", "max_length", "seed")  # seeds: --seeds


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="one method over values of one option (e.g. LoRA rank); table and plots",
        description="Train --method once per value of --param, each in its own process, on one "
        "task and budget, once per seed; measure and report as `peftkit compare` does.")
    p.add_argument("--method", default="lora",
                   help="the method or preset (e.g. dora) to sweep (default: lora)")
    p.add_argument("--param", required=True, help="a `peftkit train` option, e.g. r, "
                                                  "lora_dropout, learning_rate")
    p.add_argument("--values", required=True, help="comma-separated values, e.g. 4,8,16,32,64")
    p.add_argument("--alpha-ratio", type=float, default=2.0,
                   help="with --param r: lora_alpha = ratio x r, the seed's alpha = 2r "
                        "(default: 2; 0 keeps lora_alpha fixed)")
    p.add_argument("--reference", default="full",
                   help="the 100%% row: `full` (train it), `none`, or a results.json of an "
                        "earlier compare with the same setup (its full and zero-shot rows)")
    options.add_arguments(p)
    p.set_defaults(func=_run)


def _reference_rows(path: str, setup) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        old = json.load(fh)
    if not setup.matches(old.get("setup", {})):
        raise ValueError(f"{path} was made with another setup (task, data, model or budget); "
                         "run the sweep with the same flags or use --reference full")
    rows = [r for r in old["runs"] if r["method"] in ("full", "zero-shot") and r["status"] == "ok"]
    if not any(r["method"] == "full" for r in rows):
        raise ValueError(f"{path} has no successful `full` run to compare against")
    return rows


def _run(args) -> int:
    from ..experiments.experiment import run_experiment
    from ..experiments.runs import ZERO_SHOT, Run

    variant = variants.get(args.method, "--method")
    param = args.param.replace("-", "_")
    if param in BUDGET:
        raise ValueError(f"--param {args.param} is part of the budget every run shares; "
                         "give it once with its own flag")
    values = [v.strip() for v in args.values.split(",") if v.strip()]
    if len(values) < 2:
        raise ValueError("--values needs at least two comma-separated values")
    extra = options.overrides(args)
    setup = options.setup(args)
    rows = []
    for value in values:
        flags = {**variants.flags(variant, extra), param: options.parse_value(value)}
        if param == "r" and args.alpha_ratio and "lora_alpha" in flags:
            flags["lora_alpha"] = args.alpha_ratio * int(value)
        rows.append((f"{param}={value}", variant.method, flags))
    fixed = []
    if args.reference == "full":
        rows.insert(0, ("full", "full", variants.flags(variants.get("full", ""), extra)))
    runs = [Run(label, method, flags, seed) for seed in args.seeds for label, method, flags in rows]
    if args.reference == "full":
        runs.insert(0, Run(ZERO_SHOT, ZERO_SHOT))
    elif args.reference != "none":
        fixed = _reference_rows(args.reference, setup)
    label = None if args.reference == "none" else "full"
    results = run_experiment(runs, setup, args.out, label, options.command(args.argv),
                             args.resume, fixed)
    return 0 if all(r["status"] == "ok" for r in results["runs"]) else 1
