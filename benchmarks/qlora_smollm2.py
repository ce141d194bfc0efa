"""QLoRA end to end on the embedded SmolLM2-135M: NF4 base with double quantization,
`prepare_model_for_kbit_training`, LoRA r=16 on q,k,v,o, a few AdamW steps, then
`merge_and_unload(dequantize=True)`, saved and reloaded with plain transformers.

Compute dtype: bf16 on CUDA (QLoRA's recipe); fp32 on CPU, where bf16 matmuls without
AVX512-BF16 hardware are emulated and a step takes minutes instead of seconds.

    python benchmarks/qlora_smollm2.py [--steps 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

import peftkit
from peftkit import models

QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."


def answer(model, tokenizer, question: str = QUESTION) -> str:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model, tokenizer = models.load_default(dtype=dtype, quantize="nf4")
    device = model.device
    model = peftkit.prepare_model_for_kbit_training(model)
    config = peftkit.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = peftkit.get_peft_model(model, config)
    model.print_trainable_parameters()

    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}],
        tokenize=False)
    batch = tokenizer([chat, chat], return_tensors="pt").to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(args.steps):
        start = time.perf_counter()
        loss = model(**batch, labels=batch.input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.1f} s)")

    model.eval()
    merged = model.merge_and_unload(dequantize=True)
    with tempfile.TemporaryDirectory() as out:
        merged.save_pretrained(out)
        plain = AutoModelForCausalLM.from_pretrained(out).to(device).eval()
    kinds = sorted({type(m).__name__ for n, m in plain.named_modules() if n.endswith("_proj")})
    print(f"reloaded with plain transformers: {type(plain).__name__}, projections {kinds}, "
          f"dtype {plain.dtype}")
    print(f"greedy answer: {answer(plain, tokenizer)!r}")


if __name__ == "__main__":
    main()
