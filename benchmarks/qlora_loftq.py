"""How much closer LoftQ-style initialisation (peftkit.methods.loftq) brings the NF4 SmolLM2-135M
to its full-precision weights and outputs, against QLoRA's B = 0 start.

NF4 base with double quantization and fp32 compute (so the only gap is quantization), LoRA on
every linear layer of the blocks. Reported per rank: the relative weight error
||W - dequant(Q) - scaling * B @ A||_F / ||W||_F over all adapted layers together (B = 0: the
plain quantization error), and the mean KL(full || adapted) of the next-token distributions over
a short chat.

    python benchmarks/qlora_loftq.py [--ranks 16 64]
"""

from __future__ import annotations

import argparse
import math

import torch

import peftkit
from peftkit import models
from peftkit.methods.loftq import loftq_init

TEXT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."},
        {"role": "assistant", "content": "The capital of France is Paris, on the Seine."}]


def mean_kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(softmax(reference) || softmax(logits)); both (T, vocab)."""
    p = reference.float().log_softmax(-1)
    q = logits.float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    args = parser.parse_args()

    full, tokenizer = models.load_default(dtype=torch.float32)
    text = tokenizer.apply_chat_template(TEXT, tokenize=False)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = full(input_ids=ids).logits[0]
    weights = full.state_dict()
    print(f"{ids.shape[1]} tokens; LoRA on every linear layer of the blocks\n")
    print("| rank | init | layers | relative weight error | mean KL to full (nats) |")
    print("|---:|---|---:|---:|---:|")
    for r in args.ranks:
        model, _ = models.load_default(dtype=torch.float32, device="cpu", quantize="nf4")
        config = peftkit.LoraConfig(r=r, lora_alpha=r, target_modules="all-linear")
        model = peftkit.get_peft_model(model, config).eval()
        with torch.no_grad():
            kl_before = mean_kl(reference, model(input_ids=ids).logits[0])
        report = loftq_init(model, weights)
        with torch.no_grad():
            kl_after = mean_kl(reference, model(input_ids=ids).logits[0])
        w_norm = math.sqrt(sum(weights[f"{p}.weight"].norm().item() ** 2 for p in report))
        before = math.sqrt(sum(b * b for b, _ in report.values())) / w_norm
        after = math.sqrt(sum(a * a for _, a in report.values())) / w_norm
        n = len(report)
        print(f"| {r} | QLoRA (B = 0) | {n} | {before:.4f} | {kl_before:.5f} |")
        print(f"| {r} | LoftQ (SVD of residual) | {n} | {after:.4f} | {kl_after:.5f} |")
        del model


if __name__ == "__main__":
    main()
