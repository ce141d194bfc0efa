"""Inference forward of a mixed-adapter batch vs a single-adapter batch, in one process.

A batch of `--batch` rows (default 16 x 128 tokens) whose rows are spread over `--adapters`
LoRA adapters (row i gets adapter i mod n; r=16 on q, k, v, o) runs through peftkit's
`model(input_ids, adapter_names=[...])`, against the same batch through one adapter
(`model(input_ids)`), under `torch.no_grad()` on the embedded SmolLM2. Rounds alternate the two
(and PEFT's mixed forward of the same adapters with `--peft`), so slow phases of a shared
machine hit all; the first round warms up and is not counted. It prints the median wall time of
each and the median per-round ratio mixed / single (target: at most 1.3x), also in process CPU
time (steadier on a shared machine), and with `--peft` the largest difference between PEFT's
mixed logits and peftkit's.

On a busy machine two threads wait on each other at every small op (the mixed forward has more
of them); `--threads 1` measures the work itself.

    python benchmarks/mixed_batch.py --rounds 10 --peft
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch

from lora_step import QKVO, load_model


def build(base, n: int, tmp: str, with_peft: bool):
    """(peftkit model, PEFT model or None), both holding the same n adapters a0..a{n-1}."""
    import peftkit

    model = None
    for i in range(n):
        torch.manual_seed(i)
        config = peftkit.LoraConfig(r=16, lora_alpha=32, target_modules=QKVO,
                                    init_lora_weights=False)
        if model is None:
            model = peftkit.get_peft_model(copy.deepcopy(base), config, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", config)
    model.set_adapter("a0")
    model.eval()
    if not with_peft:
        return model, None
    import peft

    model.save_pretrained(tmp)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/a0", adapter_name="a0")
    for i in range(1, n):
        ref.load_adapter(f"{tmp}/a{i}", adapter_name=f"a{i}")
    return model, ref.eval()


def timed(fn) -> tuple[float, float, torch.Tensor]:
    """(wall seconds, process CPU seconds, logits) of one no-grad forward."""
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        logits = fn().logits
    return time.perf_counter() - start, time.process_time() - cpu, logits


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "tiny-llama"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--peft", action="store_true", help="also time PEFT's mixed forward")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_model(args.model, torch.float32)
    ids = torch.randint(3, base.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(1))
    names = [f"a{i % args.adapters}" for i in range(args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        model, ref = build(base, args.adapters, tmp, args.peft)
    runs = {"single": lambda: model(input_ids=ids),
            "mixed": lambda: model(input_ids=ids, adapter_names=names)}
    if ref is not None:
        runs["peft-mixed"] = lambda: ref(input_ids=ids, adapter_names=names)
    times = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    logits = {}
    for i in range(args.rounds + 1):
        for k, fn in runs.items():
            t, c, logits[k] = timed(fn)
            if i:
                times[k].append(t)
                cpu[k].append(c)

    def ratio(ts):
        return statistics.median([m / s for m, s in zip(ts["mixed"], ts["single"])])

    result = {"times": times, "ratio": ratio(times), "cpu_ratio": ratio(cpu)}
    print(f"{args.model} {args.batch}x{args.seq}, {args.adapters} adapters, median of "
          f"{args.rounds} alternating rounds")
    for k, ts in times.items():
        print(f"{k:<11} {statistics.median(ts):8.3f} s wall "
              f"{statistics.median(cpu[k]):8.3f} s CPU")
    print(f"mixed / single: {result['ratio']:.2f}x wall, {result['cpu_ratio']:.2f}x CPU "
          "(target <= 1.3x)")
    if ref is not None:
        result["peft_max_diff"] = (logits["peft-mixed"] - logits["mixed"]).abs().max().item()
        print(f"peft-mixed / mixed: "
              f"{statistics.median(times['peft-mixed']) / statistics.median(times['mixed']):.2f}x"
              f"; max |logits difference| {result['peft_max_diff']:.2e}")
    return result


if __name__ == "__main__":
    main()
