"""`peftkit chat`: an interactive conversation through the chat template. Empty line or EOF
ends it; `/reset` starts over."""

from __future__ import annotations

import sys

from ..errors import UserError
from .common import add_model_arguments
from .generate import add_sampling_arguments, complete, prompt_ids


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="talk to a model (optionally with an adapter)")
    add_model_arguments(p)
    p.add_argument("--system", help="system message")
    add_sampling_arguments(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..train.loading import load_for_inference

    model, tokenizer = load_for_inference(args.adapter, args.model)
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError("this tokenizer has no chat template; use `peftkit generate --raw`")
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        if line.strip() == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": line.strip()})
        reply = complete(model, tokenizer, prompt_ids(tokenizer, messages), args).strip()
        messages.append({"role": "assistant", "content": reply})
        print(f"assistant> {reply}" if interactive else reply, flush=True)
