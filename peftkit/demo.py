"""`make demo`: the seed's LoRA recipe, end to end, on the embedded SmolLM2-135M-Instruct.

Injects LoRA (r=16, alpha=32, q/k/v/o, dropout 0.05), prints the trainable parameters, fine-tunes
briefly with transformers' Trainer on a generated extraction task (sentence -> one-line JSON),
shows greedy answers before and after, saves the adapter in PEFT's layout, reloads it onto a fresh
base model, merges it, and checks that every step gives the same logits.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

import torch

NAMES = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jude",
         "Kofi", "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara"]
CITIES = ["Paris", "Lagos", "Lima", "Oslo", "Pune", "Quito", "Rome", "Seoul", "Tokyo", "Vienna",
          "Cairo", "Dakar", "Hanoi", "Kyiv", "Accra", "Berlin", "Dublin", "Madrid", "Nairobi"]
TEMPLATES = ["{name} is {age} and lives in {city}.", "Living in {city}, {name} just turned {age}.",
             "{name}, aged {age}, moved to {city}.", "At {age}, {name} calls {city} home."]


def extraction_examples(n: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, completion) pairs: a sentence about a person -> `{"name", "age", "city"}` JSON."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 90)
        sentence = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
        answer = json.dumps({"name": name, "age": age, "city": city})
        out.append((f"Extract name, age and city as JSON: {sentence}", answer))
    return out


def encode(tokenizer, prompt: str, completion: str | None = None) -> dict:
    """Chat-template token ids; with a completion, labels mask the prompt with -100."""
    messages = [{"role": "user", "content": prompt}]
    prefix = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    if completion is None:
        return {"input_ids": ids}
    answer = tokenizer(completion + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return {"input_ids": ids + answer, "labels": [-100] * len(ids) + answer}


def collate(tokenizer):
    def fn(rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for r in rows:
            pad = width - len(r["input_ids"])
            batch["input_ids"].append(r["input_ids"] + [tokenizer.pad_token_id] * pad)
            batch["attention_mask"].append([1] * len(r["input_ids"]) + [0] * pad)
            batch["labels"].append(r["labels"] + [-100] * pad)
        return {k: torch.tensor(v) for k, v in batch.items()}

    return fn


@torch.no_grad()
def answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Batched greedy generation (left padding); returns the decoded completions."""
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                           add_generation_prompt=True, tokenize=False)
             for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return [t.strip() for t in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                                      skip_special_tokens=True)]


def exact_match(model, tokenizer, pairs) -> tuple[float, list[str]]:
    got = answers(model, tokenizer, [p for p, _ in pairs])
    return sum(g == c for g, (_, c) in zip(got, pairs)) / len(pairs), got


def run_demo(steps: int = 40, output_dir: str = "runs/demo") -> int:
    """Run the demo; returns 0 when the reloaded and merged models match the trained one."""
    from transformers import Trainer, TrainingArguments

    from peftkit import LoraConfig, PeftModel, TaskType, get_peft_model
    from peftkit.models import load_default

    torch.manual_seed(0)
    model, tokenizer = load_default()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train = [encode(tokenizer, p, c) for p, c in extraction_examples(400, seed=0)]
    test = extraction_examples(16, seed=1)

    print("\n== 1. The seed's LoRA config on SmolLM2-135M-Instruct")
    lora_config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=16, lora_alpha=32,
                             target_modules=["q_proj", "v_proj", "k_proj", "o_proj"],
                             lora_dropout=0.05, bias="none")
    model = get_peft_model(model, lora_config)
    model.print_trainable_parameters()

    before, before_answers = exact_match(model, tokenizer, test)
    print(f"\n== 2. Before training: exact match {before:.0%} on {len(test)} held-out sentences")
    print(f"   Q: {test[0][0]}\n   A: {before_answers[0]!r}")

    print(f"\n== 3. Fine-tuning for {steps} steps (batch 8, lr 1e-3)")
    targs = TrainingArguments(output_dir=os.path.join(output_dir, "trainer"),
                              max_steps=steps, per_device_train_batch_size=8,
                              learning_rate=1e-3, warmup_steps=4, logging_steps=10,
                              save_strategy="no", report_to=[], use_cpu=True, seed=0)
    start = time.time()
    model.train()
    Trainer(model=model, args=targs, train_dataset=train, data_collator=collate(tokenizer)).train()
    model.eval()
    print(f"   trained in {time.time() - start:.0f} s")

    after, after_answers = exact_match(model, tokenizer, test)
    print(f"\n== 4. After training: exact match {after:.0%}")
    for (prompt, want), got in list(zip(test, after_answers))[:3]:
        print(f"   Q: {prompt}\n   A: {got}   [{'ok' if got == want else 'expected ' + want}]")

    adapter_dir = os.path.join(output_dir, "lora_weights")
    model.save_pretrained(adapter_dir)
    print(f"\n== 5. Saved {sorted(os.listdir(adapter_dir))} to {adapter_dir}")

    probe = tokenizer([p for p, _ in test[:4]], return_tensors="pt", padding=True)
    with torch.no_grad():
        trained_logits = model(**probe).logits
        reloaded = PeftModel.from_pretrained(load_default()[0], adapter_dir)
        reload_diff = (reloaded(**probe).logits - trained_logits).abs().max().item()
        merged = reloaded.merge_and_unload()
        merge_diff = (merged(**probe).logits - trained_logits).abs().max().item()
    print(f"== 6. Reloaded adapter: max |logit diff| = {reload_diff:.2e}")
    print(f"   merge_and_unload(): {type(merged).__name__}, max |logit diff| = {merge_diff:.2e}")
    ok = reload_diff < 1e-4 and merge_diff < 1e-4
    print("\nDemo " + ("passed." if ok else "FAILED: outputs differ."))
    return 0 if ok else 1


if __name__ == "__main__":
    from peftkit.cli import main

    raise SystemExit(main(["demo", *sys.argv[1:]]))
