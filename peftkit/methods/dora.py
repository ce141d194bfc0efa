"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024, arXiv:2402.09353).

DoRA splits the adapted weight into a direction and a trained magnitude m (out_features,):

    W' = m / ||W0 + s * B @ A||_row * (W0 + s * B @ A),      W0: (out, in), s = scaling

where ||.||_row is the L2 norm of each output row (for GPT-2's Conv1D, stored (in, out), each
column). m starts at that norm, so the model is unchanged at injection. As in the paper (section
4.3) and in PEFT, the norm is detached: no gradient flows through it. With f = m / norm (1, out),
the forward adds to the base output y = W0 x + bias

    (f - 1) * (W0 x) + f * s * B @ A @ x

with W0 x taken from y (bias removed) unless dropout is active; then both terms see the dropped x
and W0 x is recomputed, as PEFT does. Merging replaces W0 by f * (W0 + s * B @ A) with the norm
of the unmerged weight; unmerging divides by f and subtracts the delta.

The forward runs through `fast.dora_fn.DoraFunction` when the speed layer's LoRA function is on
and no hook would be skipped (same values, less saved for backward), else through the
submodules with autograd, PEFT's way. Over a k-bit base (`qlora.KbitLoraLinear`, QDoRA) W0 is
the dequantized weight, as in PEFT; merging there re-quantizes (see qlora.py).

In memory the magnitude is `<path>.lora_magnitude_vector.<adapter>.weight`; on disk
`base_model.model.<path>.lora_magnitude_vector`, shape (out_features,), PEFT's layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..fast import dora_fn, lora_fn
from ..fast.hooks import bypassable

if TYPE_CHECKING:
    from .lora import LoraLinear


class Magnitude(nn.Module):
    """Holds m as `.weight`, so in-memory keys are PEFT's."""

    def __init__(self, norm: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(norm)


def row_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||weight + delta|| of each output row, both (out, in); (out,)."""
    return torch.linalg.norm(weight + delta, dim=1)


def weight_norm(layer: "LoraLinear", name: str, dtype: torch.dtype,
                dense: torch.Tensor | None = None) -> torch.Tensor:
    """||W0 + s * B @ A||_row in `dtype`, (out,), detached: W0 + s * B @ A as one fused
    multiply-add, the only (out, in) temporary besides a dequantized k-bit W0. `dense`: W0 as
    (out, in) if the caller has it (`layer.dense_weight()`)."""
    dense = layer.dense_weight() if dense is None else dense
    with torch.no_grad():
        a, b = layer.lora_A[name].weight.to(dtype), layer.lora_B[name].weight.to(dtype)
        summed = torch.addmm(dense.to(dtype), b, a, alpha=layer.scaling[name])
        return torch.linalg.norm(summed, dim=1)


class DoraVariant:
    """The DoRA arithmetic of a `LoraLinear` adapter (the layer's `VARIANTS` table names it)."""

    @staticmethod
    def init(layer: "LoraLinear", name: str) -> None:
        """m = ||W0 + s * B @ A||_row, in the adapter dtype (after A and B are initialised)."""
        a = layer.lora_A[name].weight
        with torch.no_grad():
            norm = row_norm(layer.dense_weight().to(a.dtype), layer.lora_delta(name).to(a.dtype))
        layer.lora_magnitude_vector[name] = Magnitude(norm)

    @staticmethod
    def fused(layer: "LoraLinear", name: str) -> bool:
        """Whether `forward` runs through `fast.dora_fn.DoraFunction`: the speed layer's LoRA
        function is on and no hook of A, B, the dropout or the magnitude would be skipped."""
        return (layer.use_lora_function and lora_fn.fusable(
            layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name])
            and bypassable(layer.lora_magnitude_vector[name], Magnitude))

    @staticmethod
    def forward(layer: "LoraLinear", name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + (f - 1) * W0 x + f * s * B A x, x: (..., in), y: (..., out) the base output.

        With the speed layer's LoRA function on and no hooks to run, through
        `fast.dora_fn.DoraFunction` (same values, saves one (N, out) tensor and x); else PEFT's
        autograd expression on the submodules."""
        a, b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
        magnitude = layer.lora_magnitude_vector[name]
        scaling = layer.scaling[name]
        if DoraVariant.fused(layer, name):
            active = isinstance(dropout, nn.Dropout) and dropout.training and layer.training
            p = dropout.p if active else 0.0
            dense = layer.dense_weight()  # dequantized once (k-bit) for the norm and W0 x_d
            norm = weight_norm(layer, name, a.weight.dtype, dense)
            return dora_fn.dora_forward(y, x, a.weight, b.weight, magnitude.weight, norm,
                                        dense if p > 0 else None, layer.bias, scaling, p)
        x = x.to(a.weight.dtype)
        weight = layer.dense_weight().to(x.dtype)
        lora_weight = (b.weight @ a.weight).detach().to(x.dtype)
        norm = row_norm(weight, scaling * lora_weight).detach()
        f = layer.lora_magnitude_vector[name].weight / norm
        if isinstance(dropout, nn.Identity) or not layer.training:
            bias = layer.bias
            base = y if bias is None else y - bias
        else:
            x = dropout(x)
            base = F.linear(x, weight)
        return y + (f - 1) * base + f * b(a(x)) * scaling

    @staticmethod
    def merge(layer: "LoraLinear", name: str, weight: torch.Tensor,
              unmerged: torch.Tensor) -> torch.Tensor:
        """f * (weight + delta), fp32 in the layout of the base weight; f from the norm of
        `unmerged` (W0 without the adapters merged before this one), kept for `unmerge`."""
        delta = layer.lora_delta(name)
        norm = row_norm(layer.out_in(unmerged), delta)
        layer.merged_norms[name] = norm
        return layer.out_in(_factor(layer, name, norm) * (layer.out_in(weight) + delta))

    @staticmethod
    def unmerge(layer: "LoraLinear", name: str, weight: torch.Tensor) -> torch.Tensor:
        """weight / f - delta, the inverse of `merge`."""
        f = _factor(layer, name, layer.merged_norms[name])
        return layer.out_in(layer.out_in(weight) / f - layer.lora_delta(name))


def _factor(layer: "LoraLinear", name: str, norm: torch.Tensor) -> torch.Tensor:
    """f = m / norm as a column (out, 1), fp32."""
    return (layer.lora_magnitude_vector[name].weight.detach().float() / norm).view(-1, 1)
