"""LoftQ-style initialisation of LoRA over a quantized base (Li et al., 2023, arXiv:2310.08659).

QLoRA starts from B = 0, i.e. from the quantized model dequant(Q), which differs from the
full-precision model by the quantization residual R = W - dequant(Q), W: (out, in). LoftQ
instead chooses the adapter so that the adapted layer starts as close to W as rank r allows:

    min_{A, B} || W - dequant(Q) - scaling * B @ A ||_F   ->   truncated SVD  R ~ U_r S_r V_r^T

    B = U_r sqrt(S_r) / sqrt(scaling)      (out, r)
    A = sqrt(S_r) V_r^T / sqrt(scaling)    (r, in)

so scaling * B @ A = U_r S_r V_r^T, the best rank-r approximation of R (Eckart-Young); the
remaining error is the norm of R's discarded singular values. This is LoftQ with one alternating
step: Q stays quant(W), the base exactly as transformers/bitsandbytes load it from the original
checkpoint, so adapter files keep working on any 4-bit load of that checkpoint. (LoftQ's further
steps re-quantize W - scaling * B @ A, which changes the base weights themselves.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from .. import quant
from .qlora import KbitLoraLinear

PREFIX = "base_model.model."


def loftq_init(peft_model: nn.Module, full_precision: nn.Module | Mapping[str, torch.Tensor],
               adapter_name: str = "default") -> dict[str, tuple[float, float]]:
    """Set adapter `adapter_name`'s A and B on every k-bit LoRA layer of `peft_model` from the
    truncated SVD of that layer's quantization residual, in place.

    full_precision: the model the k-bit base was quantized from (or its `state_dict()`); its
      `<module path>.weight` (out, in) is W.
    Returns `{module path: (||R||_F, ||R - scaling * B @ A||_F)}`, the residual before and after.
    """
    weights = (full_precision.state_dict() if isinstance(full_precision, nn.Module)
               else full_precision)
    report = {}
    layers = [(n.removeprefix(PREFIX), m) for n, m in peft_model.named_modules()
              if isinstance(m, KbitLoraLinear) and adapter_name in m.lora_A]
    if not layers:
        raise ValueError(f"no LoRA layer over a k-bit base holds adapter {adapter_name!r}")
    for path, layer in layers:
        key = f"{path}.weight"
        if key not in weights:
            raise KeyError(f"full_precision has no {key!r}; pass the model the base was "
                           "quantized from, or its state_dict()")
        quantized = quant.dequantize_weight(layer.base_layer).float()
        w = weights[key].to(quantized.device, torch.float32)
        if w.shape != quantized.shape:
            raise ValueError(f"{key}: full-precision shape {tuple(w.shape)} does not match the "
                             f"quantized layer's {tuple(quantized.shape)}")
        r, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
        if r > min(w.shape):
            raise ValueError(f"{path}: rank {r} exceeds the weight's smaller side {min(w.shape)}")
        residual = w - quantized
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        root = s[:r].sqrt() / math.sqrt(scaling)
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        with torch.no_grad():
            b.copy_(u[:, :r] * root)
            a.copy_(root[:, None] * vh[:r])
        report[path] = (residual.norm().item(), s[r:].norm().item())
    return report
