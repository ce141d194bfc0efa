"""Load what the commands run: a base model (default: the embedded SmolLM2-135M-Instruct) and its
tokenizer, optionally with a saved adapter on top; a merged model folder loads as a base model."""

from __future__ import annotations

import os

import torch

from .. import models, quant
from ..model import PeftModel
from . import inputs


def model_path(model: str | None) -> str:
    if model is None or model == models.DEFAULT_MODEL:
        return models.default_model_path()
    return model


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: str | None = None, dtype: torch.dtype = torch.float32, **kwargs):
    """The model from a folder or hub id; `None` is the embedded default model. A k-bit base (a
    `quantization_config` in `kwargs`) is kept off bitsandbytes' packed CPU inference format
    (`quant.avoid_cpu_packing_`), so it computes the same on every CPU."""
    from transformers import AutoModelForCausalLM

    base = quant.avoid_cpu_packing_(
        AutoModelForCausalLM.from_pretrained(model_path(model), dtype=dtype, **kwargs))
    base.name_or_path = model or models.DEFAULT_MODEL
    return base


def load_base(model: str | None = None, dtype: torch.dtype = torch.float32, **kwargs):
    """(model, tokenizer) from a folder or hub id; `None` is the embedded default model."""
    return load_model(model, dtype, **kwargs), load_tokenizer(model_path(model))


def load_for_inference(adapter: str | None = None, model: str | None = None, **load_kwargs):
    """(model in eval mode, tokenizer). With `adapter`, the base is `model` or else the one named
    in its adapter_config.json; the tokenizer saved next to the adapter wins when there is one.
    `load_kwargs` go to `from_pretrained` (e.g. a 4-bit quantization_config). The adapter's
    files and the model's name are checked before the model loads."""
    if adapter is None:
        inputs.check_model(model)
        base, tokenizer = load_base(model, **load_kwargs)
        return base.eval(), tokenizer
    config = inputs.adapter_config(adapter)
    inputs.check_model(model or config.base_model_name_or_path)
    base, tokenizer = load_base(model or config.base_model_name_or_path, **load_kwargs)
    if os.path.isfile(os.path.join(adapter, "tokenizer_config.json")):
        tokenizer = load_tokenizer(adapter)
    return PeftModel.from_pretrained(base, adapter, config=config).eval(), tokenizer
