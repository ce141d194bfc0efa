"""A tiny character-level tokenizer with a ChatML chat template, and a tiny Llama saved with it,
for the training tests (no downloads)."""

from __future__ import annotations

import os

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 \n:,.?-/#"
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(eos: str = "<|im_end|>"):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token=eos,
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model_dir(path: str, seed: int = 0) -> str:
    """Save a random tiny Llama (vocab sized to the tokenizer) plus the tokenizer in `path`."""
    from peftkit import models

    tokenizer = tiny_tokenizer()
    model = models.tiny_llama(seed, vocab_size=len(tokenizer), pad_token_id=1, bos_token_id=2,
                              eos_token_id=tokenizer.eos_token_id, max_position_embeddings=256)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
