"""The Try tab: chat with an adapter and its base model side by side, and evaluate on a data file
with each row's exact match. Models load through `load_for_inference` (as `peftkit chat` and
`peftkit eval` do) and answer through the same functions as those commands; the last few stay
loaded, and one request computes at a time."""

from __future__ import annotations

import argparse
import threading
import time
from collections import OrderedDict

from ..errors import UserError

KEEP = 2  # loaded models kept (an adapter and its base)


class Models:
    """(model, tokenizer) pairs by (adapter, base model), least recently used dropped first."""

    def __init__(self) -> None:
        self._loaded: OrderedDict = OrderedDict()
        self.lock = threading.Lock()  # held by whoever loads or computes

    def get(self, adapter: str | None, model: str | None):
        from ..train.loading import load_for_inference

        key = (adapter or None, model or None)
        if key not in self._loaded:
            while len(self._loaded) >= KEEP:
                self._loaded.popitem(last=False)
            self._loaded[key] = load_for_inference(*key)
        self._loaded.move_to_end(key)
        return self._loaded[key]


def base_of(adapter: str) -> str | None:
    """The base model named in an adapter's adapter_config.json."""
    from ..train.inputs import adapter_config

    return adapter_config(adapter).base_model_name_or_path


def chat(models: Models, messages: list[dict], adapter: str | None = None,
         model: str | None = None, max_new_tokens: int = 64, temperature: float = 0.0) -> dict:
    """The assistant's next reply to `messages` (role/content dicts), as `peftkit chat` gives it;
    without a chat template, the last user message completed as plain text."""
    from ..commands.generate import complete, prompt_ids

    if not messages or messages[-1].get("role") != "user":
        raise UserError("send a user message")
    if not 1 <= int(max_new_tokens) <= 1024:
        raise UserError("max new tokens: give 1 to 1024")
    with models.lock:
        started = time.perf_counter()
        lm, tokenizer = models.get(adapter, model)
        turns = [{"role": m["role"], "content": str(m["content"])} for m in messages]
        templated = getattr(tokenizer, "chat_template", None) is not None
        ids = prompt_ids(tokenizer, turns if templated else turns[-1]["content"])
        sampling = argparse.Namespace(max_new_tokens=int(max_new_tokens),
                                      temperature=float(temperature), seed=0)
        reply = complete(lm, tokenizer, ids, sampling).strip()
    return {"reply": reply, "seconds": time.perf_counter() - started}


def evaluate(models: Models, data: str, adapter: str | None = None, model: str | None = None,
             limit: int | None = 20, max_new_tokens: int = 64) -> dict:
    """`peftkit eval` on `data` (first `limit` rows): exact match, loss and every row."""
    from ..train.evaluate import evaluate as run_eval
    from ..train.examples import check_data

    check_data(data)
    with models.lock:
        lm, tokenizer = models.get(adapter, model)
        result = run_eval(lm, tokenizer, data, max_new_tokens=int(max_new_tokens),
                          limit=int(limit) if limit else None)
    rows = [{"prompt": p, "expected": e, "got": g, "match": g.strip() == e.strip()}
            for p, e, g in result.pop("predictions")]
    return {**result, "rows": rows}
