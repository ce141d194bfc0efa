"""Training-step time of PEFT and peftkit's step variants, alternating steps in one process.

Steadier than fresh processes on a shared machine (every variant sees the same slow minutes),
so it can tell apart variants a few percent apart; it measures time only (one process holds all
models, so no per-variant memory: `lora_step.py` measures that). Each variant has its own model
copy and AdamW state; the first two rounds warm up and are not counted.

Variants: `peft` (PEFT + transformers' loss), `library` (the model peftkit's `get_peft_model`
returns, speed layer on, in the same plain loop), `stock` (`get_peft_model(..., speed=False)`),
and `library` with one part of the speed layer off: `no-fused-loss`, `no-lean-mlp`,
`no-lora-function` (`peftkit.fast.apply`).

    python benchmarks/step_variants.py --batch 1 --seq 128 --rounds 14
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from lora_step import QKVO, load_model

VARIANTS = ("peft", "library", "stock", "no-fused-loss", "no-lean-mlp", "no-lora-function")
PART_OFF = {"no-fused-loss": "loss", "no-lean-mlp": "mlp", "no-lora-function": "lora_function"}


def step_fn(variant: str, base, ids):
    kw = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=QKVO, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    if variant == "peft":
        import peft

        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw)).train()
    else:
        import peftkit

        model = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(**kw),
                                       speed=variant != "stock").train()
        if variant in PART_OFF:
            peftkit.fast.apply(model, **{PART_OFF[variant]: False})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2",
                        choices=("smollm2", "llama-random", "tiny-llama"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=14)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    base = load_model(args.model, torch.float32)
    ids = torch.randint(3, base.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(1))
    steps = {v: step_fn(v, base, ids) for v in variants}
    times = {v: [] for v in variants}
    for i in range(args.rounds + 2):
        for v, step in steps.items():
            t = step()
            if i >= 2:
                times[v].append(t)
    ref = statistics.median(times[variants[0]])
    print(f"{args.model} {args.batch}x{args.seq}, median of {args.rounds} alternating steps")
    for v, ts in times.items():
        med = statistics.median(ts)
        print(f"{v:20s} {med:8.3g} s  {med / ref:.2f}x {variants[0]}")


if __name__ == "__main__":
    main()
