"""`peftkit estimate`: exact trainable parameters and a training memory plan, before training."""

from __future__ import annotations

import argparse
import json
import sys

from ..methods import registry
from ..train.options import add_method_arguments

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def register(subparsers) -> None:
    p = subparsers.add_parser("estimate", help="trainable parameters and a memory plan",
                              description=__doc__)
    p.add_argument("--model", required=True,
                   help="built-in name (e.g. llama-2-7b), a config.json, or a model folder")
    p.add_argument("--method", default="lora", help="|".join(registry.SPECS))
    add_method_arguments(p.add_argument_group("method options, as `peftkit train` takes them"))
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other field of the method's config (JSON value), e.g. "
                        "num_virtual_tokens=20; repeatable")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", "--max-length", dest="seq_len", type=int, default=2048)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16",
                   help="dtype of the frozen weights and of compute")
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-fused-loss", action="store_true",
                   help="plan for `peftkit train --no-fused-loss` (the loss from full fp32 logits)")
    p.add_argument("--no-double-quant", action="store_true", help="QLoRA without double quant")
    p.add_argument("--gpu", help="GPU memory, e.g. 24GB or 80GiB: says whether the plan fits")
    p.add_argument("--gpus", type=int, default=1,
                   help="number of GPUs (all nodes); with --fsdp the plan is per GPU")
    p.add_argument("--fsdp", action="store_true",
                   help="plan `peftkit train --fsdp`: weights, gradients and optimizer states "
                        "sharded over --gpus")
    p.add_argument("--fsdp-cpu-offload", action="store_true",
                   help="with --fsdp: the shards live in CPU memory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def options_from(args) -> dict:
    """Method options from the method flags given (those of another method are refused) and
    `--option KEY=VALUE` (values parsed as JSON). Flags not given keep the config's defaults."""
    given = {name: getattr(args, name) for name in registry.all_flags()}
    registry.resolve(args.method, given)
    out = {name: value for name, value in given.items() if value is not None}
    for item in args.option:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item!r}: write KEY=VALUE, e.g. num_virtual_tokens=20")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def report(est, gpu: int | None, sharded=None) -> dict:
    """The estimate as a JSON-ready dict (bytes are ints); `sharded`: a `ShardedPlan`."""
    plan, c = est.plan, est.census
    a = plan.activations
    out = {
        "model": est.model, "method": est.method,
        "trainable_params": c.trainable, "all_params": c.total,
        "trainable_percent": round(c.percent, 4),
        "settings": {"batch_size": est.settings.batch_size, "seq_len": est.settings.seq_len,
                     "dtype": str(est.settings.dtype).removeprefix("torch."),
                     "optimizer": est.settings.optimizer,
                     "gradient_checkpointing": est.settings.checkpointing,
                     "fused_loss": est.settings.fused_loss,
                     "double_quant": est.settings.double_quant},
        "bytes": {"weights": plan.weights, "gradients": plan.gradients,
                  "optimizer_states": plan.optimizer,
                  "activations": plan.activation_bytes,
                  "activations_without_checkpointing": a.plain,
                  "activations_with_checkpointing": a.checkpointed,
                  "logits": plan.logits, "dequantized_weight": plan.dequant,
                  "total": plan.total},
        "activation_formula": "Korthikanti et al. 2022 (arXiv:2205.05198) method; see "
                              "peftkit/planner/activations.py",
    }
    uncounted = registry.spec(est.method).planner.uncounted
    if uncounted:
        out["not_counted"] = uncounted
    if sharded is not None:
        out["fsdp"] = {"gpus": sharded.gpus, "cpu_offload": sharded.cpu_offload,
                       "shards": sharded.shards, "gathered_weights": sharded.gathered_weights,
                       "gathered_gradients": sharded.gathered_gradients,
                       "peak_moment": sharded.peak_moment,
                       "per_gpu_total": sharded.gpu_total, "per_process_cpu": sharded.cpu_total}
    if gpu is not None:
        out["gpu_bytes"] = gpu
        out["fits"] = (sharded.gpu_total if sharded else plan.total) <= gpu
    return out


def print_report(r: dict) -> None:
    from ..planner import gib

    b = r["bytes"]
    s = r["settings"]
    print(f"{r['model']} + {r['method']}")
    print(f"trainable params: {r['trainable_params']:,d} || all params: {r['all_params']:,d} || "
          f"trainable%: {r['trainable_percent']:.4f}")
    print(f"\nmemory plan: batch {s['batch_size']} x {s['seq_len']} tokens, {s['dtype']}, "
          f"{s['optimizer']}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}")
    for name, n in b["weights"].items():
        print(f"  weights {name:<14s} {gib(n):>12s}")
    rows = [("gradients", b["gradients"]), ("optimizer states", b["optimizer_states"]),
            ("activations", b["activations"]),
            ("  without ckpt", b["activations_without_checkpointing"]),
            ("  with ckpt", b["activations_with_checkpointing"]),
            ("loss", b["logits"])]
    if b["dequantized_weight"]:
        rows.append(("dequant buffer", b["dequantized_weight"]))
    for name, n in rows:
        print(f"  {name:<22s} {gib(n):>12s}")
    print(f"  {'total (peak)':<22s} {gib(b['total']):>12s}")
    print(f"  activations: {r['activation_formula']}")
    if "not_counted" in r:
        print(f"  not counted: {r['not_counted']}")
    total = b["total"]
    if "fsdp" in r:
        f = r["fsdp"]
        total = f["per_gpu_total"]
        where = "CPU memory of each process" if f["cpu_offload"] else "each GPU"
        print(f"\nFSDP over {f['gpus']} GPUs, per GPU:")
        for name, n in [(f"shards (in {where})", f["shards"]),
                        ("gathered weights", f["gathered_weights"]),
                        ("peak moment", f["peak_moment"]),
                        ("  gathered gradients", f["gathered_gradients"]),
                        ("total per GPU", total)]:
            print(f"  {name:<34s} {gib(n):>12s}")
    if "fits" in r:
        verdict = "fits" if r["fits"] else "does NOT fit"
        print(f"\n{verdict} in {gib(r['gpu_bytes'])} "
              f"({gib(abs(r['gpu_bytes'] - total))} {'free' if r['fits'] else 'short'})")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..planner import Settings, estimate, parse_size
    from ..planner.sharded import sharded_plan

    try:
        gpu = parse_size(args.gpu) if args.gpu is not None else None
        for name in ("batch_size", "seq_len"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        settings = Settings(batch_size=args.batch_size, seq_len=args.seq_len,
                            dtype=getattr(torch, DTYPES[args.dtype]), optimizer=args.optimizer,
                            checkpointing=args.gradient_checkpointing,
                            double_quant=not args.no_double_quant,
                            fused_loss=not args.no_fused_loss)
        if args.fsdp_cpu_offload and not args.fsdp:
            raise ValueError("--fsdp-cpu-offload plans --fsdp only")
        est = estimate(args.model, args.method, options_from(args), settings)
        sharded = sharded_plan(est.census, est.plan, settings, args.gpus, args.fsdp_cpu_offload,
                               method_full=est.census.peft_config is None) if args.fsdp else None
    except ValueError as err:
        print(f"peftkit estimate: error: {err}", file=sys.stderr)
        return 2
    r = report(est, gpu, sharded)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print_report(r)
    return 0 if r.get("fits", True) else 1
