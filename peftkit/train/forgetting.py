"""Forgetting: how far training moved a model from the untouched one on general questions.

The untouched model answers each question of `general_questions.json` greedily (a single-turn
chat when the tokenizer has a chat template, else the bare question and a newline; at most
`MAX_NEW_TOKENS`, through its end-of-sequence token). On those answer tokens, under teacher
forcing, the drift is the mean per-token

    KL(p_untouched || p_trained) = sum_v p_u(v) * (log p_u(v) - log p_t(v))      (nats)

0 for an unchanged model; it needs no data beyond the questions and measures the change of the
model's own behaviour, not its fit to some corpus.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
import torch.nn.functional as F

from .evaluate import generate_ids

QUESTIONS = os.path.join(os.path.dirname(__file__), "general_questions.json")
MAX_NEW_TOKENS = 32


def questions() -> list[str]:
    with open(QUESTIONS, encoding="utf-8") as fh:
        return json.load(fh)


def prompt_ids(question: str, tokenizer) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(question + "\n")["input_ids"]


def kl_sum(base_logits: torch.Tensor, tuned_logits: torch.Tensor,
           weights: torch.Tensor) -> tuple[float, float]:
    """(sum of weights * KL(softmax(base) || softmax(tuned)) over positions, sum of weights);
    logits (..., vocab), weights (...)."""
    lp = F.log_softmax(base_logits.float(), dim=-1)
    lq = F.log_softmax(tuned_logits.float(), dim=-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return float((kl * weights).sum()), float(weights.sum())


def _logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    return logits[:, -ids.shape[1]:].cpu()  # prompt tuning prepends virtual positions


def measure(model, tokenizer, untouched=None, batch_size: int = 8) -> float:
    """Mean per-token KL(untouched || model) on the untouched model's answers (module docstring).
    `untouched`: the model before training; None when `model` is a `PeftModel` whose base is
    untouched (not after a PiSSA/OLoRA init), which then answers with its adapters disabled. Both
    in eval mode."""
    scope = model.disable_adapter if untouched is None else contextlib.nullcontext
    base = model if untouched is None else untouched
    pad = tokenizer.pad_token_id
    total = count = 0.0
    prompts = [prompt_ids(q, tokenizer) for q in questions()]
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        with scope():
            answers = generate_ids(base, tokenizer, chunk, MAX_NEW_TOKENS)
        rows = list(zip(chunk, answers))
        width = max(len(p) + len(a) for p, a in rows)
        # right-padded, so positions need no adjusting; weight 1 where logits predict an answer
        ids = torch.tensor([p + a + [pad] * (width - len(p) - len(a)) for p, a in rows])
        mask = torch.tensor([[1] * (len(p) + len(a)) + [0] * (width - len(p) - len(a))
                             for p, a in rows])
        weights = torch.tensor([[0] * (len(p) - 1) + [1] * len(a) + [0] * (width - len(p) -
                                                                       len(a) + 1)
                                for p, a in rows], dtype=torch.float32)[:, :-1]
        with scope():
            base_logits = _logits(base, ids, mask)[:, :-1]
        s, n = kl_sum(base_logits, _logits(model, ids, mask)[:, :-1], weights)
        total, count = total + s, count + n
    return total / count
