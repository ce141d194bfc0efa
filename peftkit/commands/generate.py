"""`peftkit generate`: one completion for a prompt, greedy unless --temperature > 0."""

from __future__ import annotations

from ..train.ranges import non_negative_float, non_negative_int, positive_int
from .common import add_model_arguments


def add_sampling_arguments(p) -> None:
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed")


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="complete one prompt")
    add_model_arguments(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true",
                   help="feed the prompt as plain text instead of a chat user turn")
    add_sampling_arguments(p)
    p.set_defaults(func=_run)


def complete(model, tokenizer, ids: list[int], args) -> str:
    import torch

    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    extra = {"temperature": args.temperature} if sample else {}
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids], device=device),
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                             max_new_tokens=args.max_new_tokens, do_sample=sample,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **extra)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def prompt_ids(tokenizer, messages: list[dict] | str) -> list[int]:
    """Chat messages through the chat template; a plain string as text (with BOS if the
    tokenizer adds one), matching how `peftkit train` tokenizes prompt/completion rows."""
    if isinstance(messages, str):
        return tokenizer(messages)["input_ids"]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _run(args) -> int:
    from ..train.loading import load_for_inference

    model, tokenizer = load_for_inference(args.adapter, args.model)
    chat = not args.raw and getattr(tokenizer, "chat_template", None) is not None
    ids = prompt_ids(tokenizer, [{"role": "user", "content": args.prompt}] if chat else args.prompt)
    print(complete(model, tokenizer, ids, args))
    return 0
