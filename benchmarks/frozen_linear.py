"""Frozen fp32 linear, forward + input gradient: torch's `F.linear` (MKL sgemm) vs peftkit's
`FrozenLinear` (oneDNN), on SmolLM2-135M's linear shapes at 2,048 tokens, alternating.

    python benchmarks/frozen_linear.py --tokens 2048 --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from peftkit.frozen_linear import FrozenLinear, onednn_available

# (in, out): q/o, k/v, gate/up, down projections of SmolLM2-135M
SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))


def seconds(fn, x, weight, grad) -> float:
    x.grad = None
    start = time.perf_counter()
    fn(x, weight).backward(grad)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not onednn_available():
        raise SystemExit("oneDNN's linear is not available here (x86 CPU with torch's mkldnn)")
    variants = {"F.linear (MKL)": lambda x, w: F.linear(x, w),
                "FrozenLinear (oneDNN)": lambda x, w: FrozenLinear.apply(x, w, None)}
    print(f"{'in x out':>12} " + " ".join(f"{v:>24}" for v in variants) + "   ratio")
    total = dict.fromkeys(variants, 0.0)
    for n_in, n_out in SHAPES:
        x = torch.randn(args.tokens, n_in, requires_grad=True)
        weight, grad = torch.randn(n_out, n_in), torch.randn(args.tokens, n_out)
        times = {v: [] for v in variants}
        for _ in range(args.repeats + 1):  # the first round warms up
            for v, fn in variants.items():
                times[v].append(seconds(fn, x, weight, grad))
        med = {v: statistics.median(t[1:]) for v, t in times.items()}
        flop = 2 * 2 * args.tokens * n_in * n_out
        for v in variants:
            total[v] += med[v]
        a, b = med.values()
        print(f"{n_in:>5} x {n_out:<5} " + " ".join(f"{1e3 * s:9.2f} ms {flop / s / 1e9:6.0f} GF/s"
                                                  for s in med.values()) + f"   {b / a:.2f}x")
    a, b = total.values()
    print(f"all shapes: {1e3 * a:.1f} ms vs {1e3 * b:.1f} ms = {b / a:.2f}x")


if __name__ == "__main__":
    main()
