"""Evaluation on a data file: exact match of batched greedy generations (the completion /
last assistant message, both stripped of surrounding whitespace) and the mean loss per target
token under teacher forcing."""

from __future__ import annotations

import torch

from .examples import IGNORE, Collator, Encoded, load_examples, prompt_ids


def generate_batch(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuations of token-id prompts, left-padded into one batch; decoded text."""
    return [tokenizer.decode(ids, skip_special_tokens=True)
            for ids in generate_ids(model, tokenizer, prompts, max_new_tokens)]


def generate_ids(model, tokenizer, prompts: list[list[int]], max_new_tokens: int
                 ) -> list[list[int]]:
    """Greedy continuations of token-id prompts, left-padded into one batch: each row's new
    tokens through its first end-of-sequence token."""
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    eos = tokenizer.eos_token_id
    answers = []
    for row in out[:, width:].tolist():
        answers.append(row[:row.index(eos) + 1] if eos in row else row)
    return answers


def mean_loss(model, examples: list[dict], pad_id: int, batch_size: int) -> float:
    collate = Collator(pad_id)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i:i + batch_size])
            labels = batch.pop("labels").to(device)
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
            logits = logits[:, -labels.shape[1]:]  # prompt tuning prepends virtual positions
            shift, target = logits[:, :-1], labels[:, 1:]
            losses = torch.nn.functional.cross_entropy(
                shift.reshape(-1, shift.size(-1)), target.reshape(-1),
                ignore_index=IGNORE, reduction="sum")
            total += losses.item()
            count += int((target != IGNORE).sum())
    return total / count


def evaluate(model, tokenizer, path: str, batch_size: int = 16, max_new_tokens: int = 64,
             max_length: int | None = None, limit: int | None = None) -> dict:
    """{"exact_match", "loss", "n", "predictions": [(prompt, answer, prediction), ...]}."""
    return evaluate_examples(model, tokenizer, load_examples(path, tokenizer, max_length),
                             batch_size, max_new_tokens, limit)


def evaluate_examples(model, tokenizer, data: Encoded, batch_size: int = 16,
                      max_new_tokens: int = 64, limit: int | None = None) -> dict:
    """`evaluate` on data already loaded (`peftkit train` loads --test-data before training)."""
    samples, examples = data.samples[:limit], data.examples[:limit]
    predictions = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        prompts = [prompt_ids(s, tokenizer, data.fmt) for s in chunk]
        predictions += generate_batch(model, tokenizer, prompts, max_new_tokens)
    hits = sum(p.strip() == s.answer.strip() for p, s in zip(predictions, samples))
    return {
        "exact_match": hits / len(samples),
        "loss": mean_loss(model, examples, tokenizer.pad_token_id, batch_size),
        "n": len(samples),
        "predictions": [(s.prompt, s.answer, p) for s, p in zip(samples, predictions)],
    }
