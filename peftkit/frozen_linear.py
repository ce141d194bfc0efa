"""Frozen fp32 linear layers on CPU through oneDNN's matmul: the same product, faster there.

    y = x @ W^T + b        grad_x = grad_y @ W        x: (..., in), W: (out, in), b: (out,) or None

Most of a LoRA step on CPU is the frozen weights' matmuls, forward and input gradient (74% of a
SmolLM2 step, docs/benchmarks.md); PEFT and peftkit run the same ones. torch computes an fp32
`mm` with MKL's sgemm; oneDNN's fp32 matmul (`torch.ops.mkldnn._linear_pointwise`, the kernel
Inductor emits for CPU linears) is another fp32 GEMM (other blocking, so other rounding: errors
against float64 of the same order as MKL's, tests/test_frozen_linear.py) and runs SmolLM2's
shapes faster on x86 AVX2 cores: 0.92-0.98x alone (`python benchmarks/frozen_linear.py`), a
whole SmolLM2 training step 2-11% faster (docs/benchmarks.md). Autograd's linear with a frozen W
saves W alone; `FrozenLinear` saves the same.

`frozen_linears(model)` routes the model's frozen fp32 `nn.Linear` modules on CPU through it while
active; `peftkit train` enters it for its training steps (see `peftkit/train/trainer.py`).
"""

from __future__ import annotations

import contextlib
import functools
import platform

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from .reroute import checkpointing, rerouted


@functools.cache
def onednn_available() -> bool:
    """x86 (where it was measured; Arm's oneDNN backend is another matter) and a torch whose
    private `_linear_pointwise` op exists and still computes a linear; else torch's own path."""
    if (platform.machine().lower() not in ("x86_64", "amd64")
            or not torch.backends.mkldnn.is_available()):
        return False
    x, weight = torch.arange(15.0).view(3, 5), torch.arange(-10.0, 10.0).view(4, 5)
    bias = torch.ones(4)
    try:
        return torch.allclose(onednn_linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-5)
    except (AttributeError, RuntimeError, TypeError):
        return False


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight^T + bias by oneDNN; x: (..., in) fp32 on CPU, weight: (out, in) any strides."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


class FrozenLinear(torch.autograd.Function):
    """`F.linear(x, weight, bias)` for a frozen weight and bias: gradients for x only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(weight)
        return onednn_linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = onednn_linear(grad, weight.t(), None) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def _frozen_forward(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):  # autocast: the stock op
        return F.linear(x, linear.weight, linear.bias)
    return FrozenLinear.apply(x, linear.weight, linear.bias)


def frozen_fp32_linears(model: nn.Module) -> list[nn.Linear]:
    """The modules `frozen_linears` reroutes: plain `nn.Linear` with an fp32 CPU weight, weight
    and bias frozen. None without oneDNN, off x86, or under gradient checkpointing (the stock op
    saves W^T, `FrozenLinear` W: see `reroute.checkpointing`)."""
    if checkpointing(model) or not onednn_available():
        return []
    return [m for m in model.modules() if type(m) is nn.Linear and "forward" not in m.__dict__
            and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
            and not any(p.requires_grad for p in m.parameters())]


def frozen_linears(model: nn.Module) -> contextlib.AbstractContextManager:
    """While active, the model's frozen fp32 CPU linears compute through `FrozenLinear`."""
    return rerouted(frozen_fp32_linears(model), _frozen_forward)
