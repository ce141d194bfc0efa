"""DoRA training step against LoRA, peftkit and Hugging Face PEFT side by side, in one run.

Variants: `peftkit-lora`, `peftkit-dora` (the model peftkit's `get_peft_model` returns, speed
layer on, in a plain loop), `peft-dora`, `peft-lora` (PEFT + transformers' loss, same loop);
each the seed's config unless told otherwise: SmolLM2-135M fp32 (the embedded default), r=16,
lora_alpha=32 on q,k,v,o, dropout 0.05, AdamW, random tokens with labels = inputs.

Two phases:

- step time, same process, alternating: each variant has its own model copy and AdamW state;
  a round runs one step of each variant in turn, so the slow minutes of a shared machine hit all;
  the first two rounds warm up; the table shows the median over the other `--rounds`.
- peak training memory, a fresh process per variant (`lora_step.run_one`'s measure: the peak RSS
  during `--memory-steps` steps above the RSS of the loaded, wrapped model, after `malloc_trim`
  and a reset of the high-water mark through /proc/self/clear_refs).

    python benchmarks/dora_step.py --batch 8 --seq 256 --rounds 6
    python benchmarks/dora_step.py --batch 1 --seq 128 --rounds 3 --memory-steps 1   # smoke
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from lora_step import QKVO, load_model, rss_mb

VARIANTS = ("peftkit-lora", "peftkit-dora", "peft-dora", "peft-lora")


def make(variant: str, base, dropout: float):
    """(model, AdamW) for `variant` over `base` (not copied), seeded identically."""
    lib_name, method = variant.split("-")
    kw = dict(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=QKVO,
              task_type="CAUSAL_LM", use_dora=method == "dora")
    torch.manual_seed(0)
    if lib_name == "peft":
        import peft as lib
    else:
        import peftkit as lib
    model = lib.get_peft_model(base, lib.LoraConfig(**kw)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def step(model, opt, ids) -> tuple[float, float]:
    """One training step; (seconds, loss)."""
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start, loss.item()


def tokens(vocab: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def time_variants(args, variants: list[str]) -> dict[str, list[float]]:
    base = load_model(args.model, torch.float32)
    ids = tokens(base.config.vocab_size, args.batch, args.seq)
    runs = {v: make(v, copy.deepcopy(base), args.dropout) for v in variants}
    times = {v: [] for v in variants}
    for i in range(args.rounds + 2):
        for v, (model, opt) in runs.items():
            t, loss = step(model, opt, ids)
            if i >= 2:
                times[v].append(t)
            print(f"round {i} {v:14s} {t:7.2f} s  loss {loss:.4f}", flush=True)
    return times


def memory_one(args, variant: str) -> dict:
    """In a fresh process: peak RSS of `memory_steps` training steps above the loaded model."""
    base = load_model(args.model, torch.float32)
    with torch.no_grad():  # weights in anonymous memory, not pages of a memory-mapped file
        for p in base.parameters():
            p.data = p.data.clone()
    model, opt = make(variant, base, args.dropout)
    ids = tokens(base.config.vocab_size, args.batch, args.seq)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = rss_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    times = [step(model, opt, ids)[0] for _ in range(args.memory_steps)]
    return dict(variant=variant, peak_mb=rss_mb("VmHWM") - before, step_s=min(times))


def spawn_memory(args, variant: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", variant,
           "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq),
           "--dropout", str(args.dropout), "--memory-steps", str(args.memory_steps)]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(args, times: dict[str, list[float]], memory: dict[str, dict]) -> str:
    lines = [f"{args.model} fp32, r=16 q,k,v,o, dropout {args.dropout}, batch "
             f"{args.batch}x{args.seq}; step time: median of {args.rounds} alternating rounds; "
             f"memory: fresh process, {args.memory_steps} step(s)",
             "| variant | step time (s) | / peftkit-lora | / peft-dora | peak training memory (MB) "
             "| / peft-dora |", "|---|---|---|---|---|---|"]
    med = {v: statistics.median(ts) for v, ts in times.items()}
    for v in dict.fromkeys([*times, *memory]):
        t = med.get(v)
        mem = memory.get(v, {}).get("peak_mb")
        ratio = (lambda a, b: f"{a / b:.2f}x" if a is not None and b else "")
        lines.append(f"| {v} | {t:.3g} | " if t is not None else f"| {v} | | ")
        lines[-1] += (f"{ratio(t, med.get('peftkit-lora'))} | {ratio(t, med.get('peft-dora'))} | "
                      + (f"{mem:,.0f}" if mem is not None else "") + " | "
                      + ratio(mem, memory.get("peft-dora", {}).get("peak_mb")) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2",
                        choices=("smollm2", "llama-random", "tiny-llama"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (after 2 warm-up)")
    parser.add_argument("--memory-steps", type=int, default=2,
                        help="steps per fresh memory process; 0 skips the memory phase")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--memory-worker", metavar="VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_one(args, args.memory_worker)))
        return
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    times = time_variants(args, variants) if args.rounds > 0 else {}
    memory = {}
    if args.memory_steps > 0:
        for v in variants:
            memory[v] = spawn_memory(args, v)
            print(f"memory {v:14s} {memory[v]['peak_mb']:9,.0f} MB", flush=True)
    print(report(args, times, memory))


if __name__ == "__main__":
    main()
