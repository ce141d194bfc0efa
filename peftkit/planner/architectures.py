"""Well-known architectures' configs (no weights), and resolving `--model` to a transformers config.

`--model` is a name from `KNOWN` (case-insensitive), a `config.json` file, or a model directory
holding one. The table holds only the fields that change the parameter count or the memory plan;
everything else takes transformers' defaults. Values are those of the models' published
`config.json` files; `tests/test_planner.py` checks each total against the published count.
"""

from __future__ import annotations

import difflib
import json
import os

_LLAMA = dict(model_type="llama", tie_word_embeddings=False)
_QWEN2 = dict(model_type="qwen2")


def _llama(h, i, layers, heads, kv, vocab, **extra):
    return dict(_LLAMA, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab, **extra)


def _qwen2(h, i, layers, heads, kv, vocab, tied):
    return dict(_QWEN2, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                tie_word_embeddings=tied)


def _gpt2(n_embd, n_layer, n_head):
    return dict(model_type="gpt2", n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                vocab_size=50257, n_positions=1024)


# name -> config fields (hidden, intermediate, layers, heads, kv heads, vocabulary, ...)
KNOWN: dict[str, dict] = {
    "llama-1-65b": _llama(8192, 22016, 80, 64, 64, 32000),
    "llama-2-7b": _llama(4096, 11008, 32, 32, 32, 32000),
    "llama-2-13b": _llama(5120, 13824, 40, 40, 40, 32000),
    "llama-2-70b": _llama(8192, 28672, 80, 64, 8, 32000),
    "llama-3-8b": _llama(4096, 14336, 32, 32, 8, 128256),
    "llama-3-70b": _llama(8192, 28672, 80, 64, 8, 128256),
    "llama-3.1-8b": _llama(4096, 14336, 32, 32, 8, 128256),
    "llama-3.1-70b": _llama(8192, 28672, 80, 64, 8, 128256),
    "llama-3.2-1b": _llama(2048, 8192, 16, 32, 8, 128256, tie_word_embeddings=True),
    "llama-3.2-3b": _llama(3072, 8192, 28, 24, 8, 128256, tie_word_embeddings=True),
    "llama-3.3-70b": _llama(8192, 28672, 80, 64, 8, 128256),
    "mistral-7b": dict(_llama(4096, 14336, 32, 32, 8, 32000), model_type="mistral"),
    "mistral-7b-v0.3": dict(_llama(4096, 14336, 32, 32, 8, 32768), model_type="mistral"),
    "qwen2.5-0.5b": _qwen2(896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-1.5b": _qwen2(1536, 8960, 28, 12, 2, 151936, True),
    "qwen2.5-3b": _qwen2(2048, 11008, 36, 16, 2, 151936, True),
    "qwen2.5-7b": _qwen2(3584, 18944, 28, 28, 4, 152064, False),
    "qwen2.5-14b": _qwen2(5120, 13824, 48, 40, 8, 152064, False),
    "qwen2.5-32b": _qwen2(5120, 27648, 64, 40, 8, 152064, False),
    "qwen2.5-72b": _qwen2(8192, 29568, 80, 64, 8, 152064, False),
    "smollm2-135m": _llama(576, 1536, 30, 9, 3, 49152, tie_word_embeddings=True),
    "smollm2-360m": _llama(960, 2560, 32, 15, 5, 49152, tie_word_embeddings=True),
    "smollm2-1.7b": _llama(2048, 8192, 24, 32, 32, 49152, tie_word_embeddings=True),
    "gpt2": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "gpt2-xl": _gpt2(1600, 48, 25),
}


def load_config(spec: str):
    """A transformers `PretrainedConfig` for `spec`: a `KNOWN` name, a config.json, or a folder."""
    from transformers import AutoConfig

    key = spec.lower()
    if key in KNOWN:
        fields = dict(KNOWN[key])
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        config.name_or_path = key
        return config
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            try:
                fields = json.load(fh)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON ({err}); pass a model's config.json")
        if "model_type" not in fields:
            raise ValueError(f"{path} has no 'model_type'; is it a transformers config.json?")
        fields.pop("quantization_config", None)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        config.name_or_path = spec
        return config
    close = difflib.get_close_matches(key, KNOWN, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
        f"unknown model {spec!r}: not a built-in name, a config.json, or a folder with one.{hint} "
        f"Built-in names: {', '.join(KNOWN)}."
    )
