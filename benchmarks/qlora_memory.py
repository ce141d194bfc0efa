"""Weight memory of the embedded SmolLM2-135M in fp32, bf16, int8 and 4-bit (QLoRA's NF4 and FP4,
both with double quantization), as stored: parameters, buffers and the 4-bit block scales
(`peftkit.quant.weight_bytes`). The blocks' linear layers are quantized; the tied 49,152 x 576
embedding / lm_head and the norms stay in 16 bits (bf16; fp16 for int8, the dtype of its matmul).

    python benchmarks/qlora_memory.py
"""

from __future__ import annotations

import torch

from peftkit import models, quant

SETTINGS = [  # (label, load_default kwargs)
    ("fp32", dict(dtype=torch.float32)),
    ("bf16", dict(dtype=torch.bfloat16)),
    ("int8 (LLM.int8)", dict(dtype=torch.float16, quantize="int8")),
    ("nf4 + double quant", dict(dtype=torch.bfloat16, quantize="nf4")),
    ("fp4 + double quant", dict(dtype=torch.bfloat16, quantize="fp4")),
]


def linear_bytes(model) -> int:
    """Bytes of the blocks' linear layers alone (what quantization shrinks)."""
    return sum(quant.weight_bytes(m) for n, m in model.named_modules()
               if ".layers." in n and (quant.kbit_kind(m) or type(m) is torch.nn.Linear))


def main() -> None:
    n_linear = None
    rows = []
    for label, kwargs in SETTINGS:
        model, _ = models.load_default(device="cpu", **kwargs)
        if n_linear is None:
            n_linear = sum(m.weight.numel() for n, m in model.named_modules()
                           if ".layers." in n and type(m) is torch.nn.Linear)
        total, lin = quant.weight_bytes(model), linear_bytes(model)
        rows.append((label, total, lin))
        del model
    print(f"SmolLM2-135M-Instruct; {n_linear:,} weights in the blocks' linear layers\n")
    print("| storage | all weights (MiB) | block linears (MiB) | bits / linear weight |")
    print("|---|---:|---:|---:|")
    for label, total, lin in rows:
        print(f"| {label} | {total / 2**20:.1f} | {lin / 2**20:.1f} | {8 * lin / n_linear:.3f} |")


if __name__ == "__main__":
    main()
