"""The three row formats, each rendered as text segments marked "train on this" or not.

- prompt/completion: `{"prompt": ..., "completion": ...}`: the loss falls on the completion
  (plus EOS).
- chat: `{"messages": [{"role": ..., "content": ...}, ...]}`: rendered with the tokenizer's chat
  template; the loss falls on every assistant turn, as the template renders it (end-of-turn
  marker included).
- Alpaca: `{"instruction": ..., "input": ..., "output": ...}` (`input` optional): the Stanford
  Alpaca prompt; the loss falls on the output (plus EOS).

A dataset's format is read from its first row; every row must then have that format's fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from .rows import DataError, Row

FORMATS = {
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
}
ACCEPTED = ('{"prompt", "completion"}, {"messages": [{"role", "content"}, ...]} (chat), '
            '{"instruction", "input" (optional), "output"} (Alpaca)')

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Sample:
    """`segments`: (text, is_target) in order. `prompt` + `answer` is the last exchange, for
    generation-based evaluation: the model is given `prompt` and should produce `answer`."""

    segments: list[tuple[str, bool]]
    prompt: str
    answer: str


def detect_format(row: Row) -> str:
    keys = set(row.data)
    for name, required in FORMATS.items():
        if set(required) <= keys:
            return name
    partial = [(name, [f for f in req if f not in keys]) for name, req in FORMATS.items()
               if keys & set(req)]
    if partial:
        name, missing = partial[0]
        raise DataError(f"{row.where}: missing field {missing[0]!r} (the row looks like the "
                        f"{name} format). Accepted formats: {ACCEPTED}")
    raise DataError(f"{row.where}: no known fields (found {sorted(keys)}). Accepted formats: "
                    f"{ACCEPTED}")


def check_fields(row: Row, fmt: str) -> None:
    """Raise `DataError` unless `row` holds the fields of format `fmt`, with the right types.
    Needs no tokenizer, so data is checked before a model loads."""
    for field in FORMATS[fmt]:
        if field not in row.data or row.data[field] is None:
            raise DataError(f"{row.where}: missing field {field!r} of the {fmt} format. "
                            f"Accepted formats: {ACCEPTED}")
    if fmt == "chat":
        _assistant_turns(row)
    else:
        for field in FORMATS[fmt]:
            _text(row, field)


def to_sample(row: Row, fmt: str, tokenizer) -> Sample:
    check_fields(row, fmt)
    if fmt == "chat":
        return _chat(row, tokenizer)
    if fmt == "alpaca":
        extra = row.data.get("input") or ""
        template = ALPACA_WITH_INPUT if extra else ALPACA_NO_INPUT
        prompt = template.format(instruction=_text(row, "instruction"), input=extra)
        completion = _text(row, "output")
    else:
        prompt, completion = _text(row, "prompt"), _text(row, "completion")
    eos = tokenizer.eos_token or ""
    return Sample([(prompt, False), (completion + eos, True)], prompt, completion)


def _text(row: Row, field: str) -> str:
    value = row.data[field]
    if not isinstance(value, str):
        raise DataError(f"{row.where}: field {field!r} must be a string, got "
                        f"{type(value).__name__}")
    return value


def _assistant_turns(row: Row) -> list[int]:
    """Indices of the assistant messages of a chat row (at least one)."""
    messages = row.data["messages"]
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise DataError(f"{row.where}: 'messages' must be a list of {{\"role\", \"content\"}} "
                        "objects")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DataError(f"{row.where}: the conversation has no assistant message to train on")
    return turns


def _chat(row: Row, tokenizer) -> Sample:
    messages, turns = row.data["messages"], _assistant_turns(row)
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{row.where}: chat rows need a tokenizer with a chat template; this "
                        "model's tokenizer has none (use the prompt/completion format)")
    render = lambda msgs, gen: tokenizer.apply_chat_template(  # noqa: E731
        msgs, tokenize=False, add_generation_prompt=gen)
    segments, done = [], ""
    for i in turns:
        before, after = render(messages[:i], True), render(messages[: i + 1], False)
        if not (before.startswith(done) and after.startswith(before)):
            raise DataError(f"{row.where}: the chat template does not render conversations as "
                            "prefixes of each other, so assistant tokens cannot be isolated")
        segments += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    full = render(messages, False)
    if len(full) > len(done):
        segments.append((full[len(done):], False))
    last = turns[-1]
    return Sample(segments, render(messages[:last], True), messages[last]["content"])
