"""bitsandbytes k-bit weights: recognise, dequantize, re-quantize, and measure them.

QLoRA (Dettmers et al., 2023, arXiv:2305.14314) stores a frozen linear weight W (out, in) as
4-bit codes plus one scale per block of 64 weights (`absmax`), the codes indexing either the
NormalFloat-4 (NF4) or the FP4 codebook. Double quantization stores the block scales themselves
in 8 bits, in blocks of 256, with an fp32 scale per block (`quant_state.state2`). LLM.int8
(Dettmers et al., 2022, arXiv:2208.07339) stores W as int8 with one fp32 scale per output row
(`SCB`). bitsandbytes owns the storage and the matmuls; this module only moves weights between
those formats and full precision, the way PEFT and transformers do.

bitsandbytes is optional: everything here that needs it calls `require_bnb`, which raises an
ImportError saying how to install it.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

QUANT_TYPES = ("nf4", "fp4", "int8")


def require_bnb(feature: str):
    """Import bitsandbytes or raise an ImportError naming `feature` and the install command."""
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError(
            f"{feature} needs bitsandbytes, which is not installed; "
            "`pip install 'peftkit[quant]'` (or `pip install bitsandbytes`)"
        ) from None
    return bitsandbytes


def kbit_kind(module: nn.Module) -> str | None:
    """`"4bit"` for a bitsandbytes Linear4bit, `"8bit"` for a Linear8bitLt, else None.

    Never imports bitsandbytes: a model can only hold its layers if it is already imported.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "8bit"
    return None


def bnb_config(quant: str, compute_dtype: torch.dtype = torch.bfloat16,
               double_quant: bool = True):
    """transformers' `BitsAndBytesConfig` for `quant` in `QUANT_TYPES` (QLoRA's recipe for the
    4-bit kinds: blocks of 64, double quantization, matmuls in `compute_dtype`)."""
    if quant not in QUANT_TYPES:
        raise ValueError(f"quantize={quant!r} is not known; use one of {QUANT_TYPES}")
    require_bnb(f"quantize={quant!r}")
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant,
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype)


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The full-precision weight (out, in) a k-bit `layer` computes with.

    4-bit: in the dtype the weight had before quantization (`quant_state.dtype`); 8-bit: fp32
    (int8 codes times the row scales / 127). Bit-for-bit what the layer's matmul uses.
    """
    bnb = require_bnb("dequantizing a k-bit layer")
    kind = kbit_kind(layer)
    weight = layer.weight
    if kind == "4bit":
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # bitsandbytes repacks weights in place for its AVX512-BF16 CPU inference kernel;
            # undo that (as Params4bit.cuda() does) before reading the codes.
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state)
            layer.quant_state = weight.quant_state
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    if kind == "8bit":
        scb = layer.state.SCB if layer.state.SCB is not None else weight.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scb)
    raise TypeError(f"{type(layer).__name__} is not a bitsandbytes k-bit linear layer")


def requantize_(layer: nn.Module, weight: torch.Tensor) -> None:
    """Replace `layer`'s stored weight by `weight` (out, in), quantized with the layer's own
    settings (4-bit: quant type, block size, double quantization, storage dtype)."""
    bnb = require_bnb("re-quantizing a k-bit layer")
    kind = kbit_kind(layer)
    old = layer.weight
    if kind == "4bit":
        state = old.quant_state
        dtype = state.dtype
        new = bnb.nn.Params4bit(
            weight.detach().to(dtype), requires_grad=False, quant_type=state.quant_type,
            blocksize=state.blocksize, compress_statistics=state.nested,
            quant_storage=old.quant_storage, module=layer,
        )
        layer.weight = new.to(old.device)  # quantizes, and sets layer.quant_state
    elif kind == "8bit":
        # Int8Params quantizes in .to(device) only while its data is on the CPU.
        new = bnb.nn.Int8Params(weight.detach().to("cpu", torch.float16), requires_grad=False,
                                has_fp16_weights=False)
        layer.weight = new.to(old.device)
        layer.state.reset_grads()
        layer.state.SCB = layer.weight.SCB
    else:
        raise TypeError(f"{type(layer).__name__} is not a bitsandbytes k-bit linear layer")


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every k-bit linear of `model` (also inside adapter wrappers) by an `nn.Linear`
    holding its dequantized weight, in place, and drop transformers' quantization markers so
    `save_pretrained` writes a plain checkpoint.

    `dtype`: of the new weights; default the dtype the model was loaded in (transformers'
    `config.dtype`, as `PreTrainedModel.dequantize` does), else fp32.
    """
    config = getattr(model, "config", None)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    for path, module in list(model.named_modules()):
        if kbit_kind(module) is None:
            continue
        weight = dequantize_weight(module)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device="meta")
        linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        model.set_submodule(path, linear)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy as stored: parameters, buffers, the 4-bit block scales
    and codebooks (`absmax`, `code`; with double quantization the nested ones too) and the 8-bit
    row scales (`SCB`), each storage counted once (tied embeddings are one tensor)."""
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        kind = kbit_kind(module)
        if kind == "4bit":
            state = module.weight.quant_state
            tensors += [state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code, state.offset]
        elif kind == "8bit":
            scb = module.state.SCB if module.state.SCB is not None else module.weight.SCB
            tensors.append(scb)
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())
