"""`peftkit doctor`: check a training configuration (YAML or `peftkit train` flags) and its data
against best practices; each finding has a severity, the reason and the fix."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

FLAGS = {"method": str, "model": str, "data": str, "r": int, "lora_alpha": float,
         "lora_dropout": float, "target_modules": str, "learning_rate": float, "batch_size": int,
         "grad_accum": int, "epochs": float, "max_steps": int, "max_length": int}


def register(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="check a training config and data",
                              description=__doc__)
    p.add_argument("--config", help="a `peftkit train` YAML file; flags override its keys")
    for name, kind in FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind)
    p.add_argument("--tokenizer", help="tokenizer folder for exact token counts (else chars/4)")
    p.add_argument("--json", action="store_true", help="print the findings as a JSON list")
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

    try:
        config = doctor.normalize(load_yaml(args.config)) if args.config else {}
        config.update({k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None})
        findings = doctor.check_config(config)
        if config.get("data"):
            count = None
            if args.tokenizer:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(args.tokenizer)
                count = lambda text: len(tok(text)["input_ids"])  # noqa: E731
            rows = doctor.read_rows(str(config["data"]))
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
