"""Frozen fp32 linear layers on CPU through oneDNN's matmul: the same product, faster there.

    y = x @ W^T + b        grad_x = grad_y @ W        x: (..., in), W: (out, in), b: (out,) or None

Most of a LoRA step on CPU is the frozen weights' matmuls, forward and input gradient (73% of a
SmolLM2 8x256 step in the torch profiler, docs/benchmarks.md); PEFT and peftkit run the same
ones. torch computes an fp32 `mm` with MKL's sgemm; oneDNN's fp32 matmul
(`torch.ops.mkldnn._linear_pointwise`, which Inductor uses for CPU linears under `freezing`) is
another fp32 GEMM: other blocking, so other rounding, with errors against float64 of the same
order as MKL's (1-4x them; tests/test_frozen_linear.py). On x86 AVX2 cores it runs SmolLM2's
shapes in 0.92-0.98x MKL's time alone (`python benchmarks/frozen_linear.py`) and a whole
SmolLM2 training step 2.4% faster (`benchmarks/step_variants.py`, docs/benchmarks.md).
Autograd's linear with a frozen W saves W's storage alone (as W^T); `FrozenLinear` saves W.

`frozen_linears(model)` routes the model's frozen fp32 `nn.Linear` modules on CPU through it while
active; `peftkit train` enters it for its training steps (see `peftkit/train/trainer.py`).
`torch.backends.mkldnn.flags(enabled=False)` turns it off.
"""

from __future__ import annotations

import contextlib
import functools
import platform

import torch
from torch import nn
from torch.nn import functional as F

from .reroute import checkpointing, rerouted


@functools.cache
def _onednn_works() -> bool:
    """x86 (where it was measured; Arm's oneDNN backend is another matter) and a torch whose
    private `_linear_pointwise` op exists and still computes a linear."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    x = torch.arange(15, dtype=torch.float32).view(3, 5)
    weight = torch.arange(-10, 10, dtype=torch.float32).view(4, 5)
    bias = torch.ones(4, dtype=torch.float32)
    try:
        with torch.autocast("cpu", enabled=False):
            return torch.allclose(onednn_linear(x, weight, bias), x @ weight.t() + bias)
    except (AttributeError, RuntimeError, TypeError):
        return False


def onednn_available() -> bool:
    """Whether `frozen_linears` reroutes anything here: oneDNN built in and enabled
    (`torch.backends.mkldnn`), and `_onednn_works`."""
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and _onednn_works())


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight^T + bias by oneDNN; x: (..., in) fp32 on CPU, weight: (out, in) any strides,
    bias: (out,) or None. Returns (..., out)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class FrozenLinear(torch.autograd.Function):
    """`F.linear(x, weight, bias)` with gradients for x only: x (..., in), weight (out, in),
    bias (out,) or None, both frozen (refused otherwise: their gradients would be lost)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            raise ValueError("FrozenLinear: weight and bias must not require gradients")
        ctx.save_for_backward(weight)
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        if torch.is_grad_enabled():  # create_graph: a differentiable input gradient
            return F.linear(grad, weight.t()), None, None
        return onednn_linear(grad, weight.t(), None), None, None


def _frozen_forward(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)` through `FrozenLinear`, or the stock op where that does not apply: under CPU
    autocast (the stock op then runs in bf16), for other dtypes, or when a parameter was
    unfrozen after the context began."""
    weight, bias = linear.weight, linear.bias
    if (x.dtype != torch.float32 or torch.is_autocast_enabled("cpu") or weight.requires_grad
            or (bias is not None and bias.requires_grad)):
        return F.linear(x, weight, bias)
    return FrozenLinear.apply(x, weight, bias)


def frozen_fp32_linears(model: nn.Module) -> list[nn.Linear]:
    """The modules `frozen_linears` reroutes: plain `nn.Linear` with an fp32 CPU weight, weight
    and bias frozen. None without oneDNN (`onednn_available`) or under gradient checkpointing
    (the stock op saves W^T, `FrozenLinear` W: see `reroute.checkpointing`)."""
    if checkpointing(model) or not onednn_available():
        return []
    return [m for m in model.modules() if type(m) is nn.Linear and "forward" not in m.__dict__
            and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
            and not m.weight.requires_grad and not (m.bias is not None and m.bias.requires_grad)]


def frozen_linears(model: nn.Module) -> contextlib.AbstractContextManager:
    """While active, the model's frozen fp32 CPU linears compute through `FrozenLinear`."""
    return rerouted(frozen_fp32_linears(model), _frozen_forward)
