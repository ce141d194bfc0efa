"""`peftkit doctor`: check a training configuration (YAML or `peftkit train` flags) and its data
against best practices; each finding has a severity, the reason and the fix."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..train import options

_BOOLEAN = ("store_true", argparse.BooleanOptionalAction)


def lenient(spec: dict) -> dict:
    """argparse keywords that take a `peftkit train` option's value unchecked, so that the doctor
    explains a bad one (`--lora-dropout 1.5`) instead of argparse refusing it: a number keeps
    its plain type (`ranges.number`'s `kind`), anything else is text; booleans stay flags."""
    if spec.get("action") in _BOOLEAN:
        return {"action": spec["action"]}
    out = {k: spec[k] for k in ("nargs", "const", "metavar") if k in spec}
    return {**out, "type": getattr(spec.get("type"), "kind", str)}


def register(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="check a training config and data",
                              description=__doc__)
    p.add_argument("--config", help="a `peftkit train` YAML file; flags override its keys")
    g = p.add_argument_group("`peftkit train` options (see `peftkit train --help`)")
    for name, spec in options.specs().items():
        g.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **lenient(spec))
    p.add_argument("--tokenizer", help="tokenizer folder for exact token counts (else chars/4)")
    p.add_argument("--json", action="store_true", help="print the findings as a JSON list")
    p.add_argument("--adapter", help="instead: which serving targets (peftkit export --format) "
                                     "this saved adapter can go to as it is")
    p.set_defaults(func=run)


def load_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as err:
        raise ValueError(f"cannot read config {path!r}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of train options, got {type(data).__name__}")
    return data


def run(args: argparse.Namespace) -> int:
    from ..fast.dtype import describe as describe_training_dtype
    from ..planner import doctor

    if args.adapter:
        from ..export.adapter import Adapter, serving_targets

        for target, verdict in serving_targets(Adapter.load(args.adapter)):
            print(f"{target}: {verdict}")
        return 0
    try:
        config = doctor.normalize(load_yaml(args.config)) if args.config else {}
        config.update({k: getattr(args, k) for k in options.specs() if getattr(args, k) is not None})
        findings = doctor.check_config(config)
        if config.get("data"):
            count = None
            if args.tokenizer:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(args.tokenizer)
                count = lambda text: len(tok(text)["input_ids"])  # noqa: E731
            rows = doctor.data_rows(str(config["data"]))
            findings += doctor.check_data(rows, config.get("max_length"), count)
    except ValueError as err:
        print(f"peftkit doctor: error: {err}", file=sys.stderr)
        return 2
    print(describe_training_dtype(), file=sys.stderr if args.json else sys.stdout)
    order = {s: i for i, s in enumerate(doctor.SEVERITIES)}
    findings.sort(key=lambda f: order[f.severity])
    if args.json:
        print(json.dumps([dataclasses.asdict(f) for f in findings], indent=2))
    elif findings:
        print("\n".join(str(f) for f in findings))
    else:
        print("no findings: the configuration follows the usual practice")
    return 1 if any(f.severity == "error" for f in findings) else 0
