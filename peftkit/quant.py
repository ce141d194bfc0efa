"""bitsandbytes k-bit weights: recognise, dequantize, re-quantize, and measure them.

QLoRA (Dettmers et al., 2023, arXiv:2305.14314) stores a frozen linear weight W (out, in) as
4-bit codes plus one scale per block of 64 weights (`absmax`), the codes indexing either the
NormalFloat-4 (NF4) or the FP4 codebook. Double quantization stores the block scales themselves
in 8 bits, in blocks of 256, with an fp32 scale per block (`quant_state.state2`). LLM.int8
(Dettmers et al., 2022, arXiv:2208.07339) stores W as int8 with one fp32 scale per output row
(`SCB`). bitsandbytes owns the storage and the matmuls; this module only moves weights between
those formats and full precision, the way PEFT and transformers do.

On CPUs with AVX512-BF16 (Intel Xeon; not AMD EPYC), bitsandbytes 0.50's `Linear4bit.forward`,
in eval mode with an input that needs no grad, repacks the weight in place for a bf16 inference
kernel (`functional._convert_weight_packed_for_cpu`, gated by the module attribute
`support_avx512bf16_for_cpu`): the codes (N*K/2, 1) become (N, K/2) interleaved in 32-row
tiles, the block scales become bf16 laid out (K/64, N), double quantization is undone, and
`quant_state.packing_format_for_cpu` is set. That kernel casts inputs to bf16 whatever the
compute dtype, has no autograd formula (gradients stop at it once a layer is packed, in training
too), and fails for in_features that are not a multiple of the block size or out_features not a
multiple of 32; bitsandbytes' inverse (run by `state_dict()`) leaves a non-double-quantized
absmax transposed. So peftkit keeps the models it loads and prepares off that path
(`avoid_cpu_packing_`), and its helpers read a layer that was packed before it saw it exactly:
codes times the bf16 scales the layer now holds (`dequantize_weight`, `unpack_cpu_`).

bitsandbytes is optional: everything here that needs it calls `require_bnb`, which raises an
ImportError saying how to install it.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Mapping

import torch
from torch import nn

QUANT_TYPES = ("nf4", "fp4", "int8")
QLORA_TYPES = ("nf4", "fp4")  # the 4-bit ones


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
               double_quant: bool = True, quant_storage: torch.dtype = torch.uint8):
    """transformers' `BitsAndBytesConfig` for `quant` in `QUANT_TYPES` (QLoRA's recipe for the
    4-bit kinds: blocks of 64, double quantization, matmuls in `compute_dtype`, codes packed in
    `quant_storage` tensors)."""
    if quant not in QUANT_TYPES:
        raise ValueError(f"quantize={quant!r} is not known; use one of {QUANT_TYPES}")
    require_bnb(f"quantize={quant!r}")
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant,
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_quant_storage=quant_storage)


def cpu_packed(layer: nn.Module) -> bool:
    """Whether bitsandbytes repacked this `Linear4bit`'s weight for its AVX512-BF16 CPU kernel."""
    state = getattr(layer.weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def _plain_4bit(layer: nn.Module):
    """(codes, quant_state) of a CPU-packed `Linear4bit` in bitsandbytes' plain layout, leaving
    the layer untouched: codes (N*K/2, 1) in the original storage dtype; one fp32 absmax per block
    (N*K/64,), holding exactly the layer's bf16 scales, not double-quantized."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state = layer.weight.quant_state
    plain = copy.copy(state)
    plain.original_nested = False  # keep the bf16 scales as they are, not re-quantized
    codes, plain = _convert_weight_packed_for_cpu_inverse(layer.weight.data, plain)
    plain.absmax = state.absmax.T.reshape(-1).float()  # (K/64, N) -> row-major blocks of W
    return codes, plain


def source_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a `Linear4bit`'s weight had before quantization (what dequantization returns)."""
    state = layer.weight.quant_state
    return state.original_dtype if cpu_packed(layer) else state.dtype


def unpack_cpu_(layer: nn.Module) -> None:
    """Return a CPU-packed `Linear4bit` to bitsandbytes' plain layout, in place, without changing
    the weights it holds (its absmax stays the packed bf16 values, in fp32 and not
    double-quantized: 4 bytes per 64 weights instead of about 1)."""
    codes, state = _plain_4bit(layer)
    layer.weight.data, layer.weight.quant_state = codes, state
    layer.quant_state = state


def avoid_cpu_packing_(model: nn.Module) -> nn.Module:
    """Keep every `Linear4bit` of `model` off bitsandbytes' AVX512-BF16 CPU inference format
    (see the module docstring), unpacking those already packed; in place, returns `model`.

    Its layers then compute in their own compute dtype on the differentiable path on every CPU,
    in eval mode as in training. A no-op on CPUs without AVX512-BF16 and on GPUs."""
    for module in model.modules():
        if kbit_kind(module) == "4bit":
            module.support_avx512bf16_for_cpu = False
            if cpu_packed(module):
                unpack_cpu_(module)
    return model


def kbit_device_map(env: Mapping[str, str] | None = None, cuda: bool | None = None,
                    device_count: int | None = None) -> dict[str, int] | str:
    """The `device_map` that loads a k-bit model whole onto this process's device.

    Under torchrun (`LOCAL_RANK` set) each rank takes its local GPU, `{"": LOCAL_RANK}`, not
    cuda:0; a launcher that shows each rank one GPU (device_count 1) gets `{"": 0}`. Without
    LOCAL_RANK: the current CUDA device; without CUDA: "cpu". `env`, `cuda` and `device_count`
    default to os.environ and torch's view (they are parameters for tests).
    """
    env = os.environ if env is None else env
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        return "cpu"
    count = torch.cuda.device_count() if device_count is None else device_count
    if "LOCAL_RANK" not in env:
        return {"": torch.cuda.current_device()}
    rank = int(env["LOCAL_RANK"])
    if rank < count:
        return {"": rank}
    if count == 1:
        return {"": 0}
    raise ValueError(f"LOCAL_RANK={rank} but this process sees {count} GPUs; launch at most "
                     f"{count} processes per node, or show each rank one GPU "
                     "(CUDA_VISIBLE_DEVICES)")


def kbit_load_kwargs(quant_type: str, sharded: bool = False) -> dict:
    """`from_pretrained` keywords that load a base in 4-bit `quant_type` on this process's device
    (`kbit_device_map`): bf16 compute on CUDA; fp32 on CPU, where bf16 matmuls are emulated (10x
    slower) on processors without AVX512-BF16. `sharded` (FSDP): the model loads in the compute
    dtype and the 4-bit codes are stored in tensors of that dtype, so the sharded units hold one
    dtype (PEFT's FSDP-QLoRA recipe: `bnb_4bit_quant_storage` = the model dtype)."""
    cuda = torch.cuda.is_available()
    compute = torch.bfloat16 if cuda else torch.float32
    storage = compute if sharded else torch.uint8
    return {"quantization_config": bnb_config(quant_type, compute_dtype=compute,
                                              quant_storage=storage),
            "device_map": kbit_device_map(cuda=cuda), **({"dtype": compute} if sharded else {})}


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The full-precision weight (out, in) a k-bit `layer` computes with.

    4-bit: in the dtype the weight had before quantization (`source_dtype`); a CPU-packed layer
    is read as it stands (its bf16 scales) and left packed. 8-bit: fp32 (int8 codes times the
    row scales / 127). Bit-for-bit what the layer's matmul uses.
    """
    bnb = require_bnb("dequantizing a k-bit layer")
    kind = kbit_kind(layer)
    weight = layer.weight
    if kind == "4bit":
        codes, state = _plain_4bit(layer) if cpu_packed(layer) else (weight.data,
                                                                     weight.quant_state)
        return bnb.functional.dequantize_4bit(codes, state)
    if kind == "8bit":
        scb = layer.state.SCB if layer.state.SCB is not None else weight.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scb)
    raise TypeError(f"{type(layer).__name__} is not a bitsandbytes k-bit linear layer")


def requantize_(layer: nn.Module, weight: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Replace `layer`'s stored weight by `weight` (out, in), quantized with the layer's own
    settings (4-bit: quant type, block size, double quantization, storage dtype; those it had
    before a CPU packing); the new weight is in the plain layout. 4-bit: `weight` is cast to
    `dtype` (default `source_dtype(layer)`) before quantizing, which dequantization returns."""
    bnb = require_bnb("re-quantizing a k-bit layer")
    kind = kbit_kind(layer)
    old = layer.weight
    if kind == "4bit":
        state = old.quant_state
        nested = state.original_nested if cpu_packed(layer) else state.nested
        new = bnb.nn.Params4bit(
            weight.detach().to(dtype or source_dtype(layer)), requires_grad=False,
            quant_type=state.quant_type, blocksize=state.blocksize, compress_statistics=nested,
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
