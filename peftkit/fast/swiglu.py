"""A SwiGLU MLP whose backward keeps two activations instead of three.

    out = down(silu(gate(x)) * up(x))        (Shazeer, 2020, arXiv:2002.05202)

Autograd on transformers' `down_proj(act_fn(gate_proj(x)) * up_proj(x))` saves g = gate(x),
u = up(x) and silu(g): three (N, I) tensors per layer (I the intermediate size, 1,536 in
SmolLM2: 36 MiB per layer at 2,048 tokens in fp32, the largest share of a LoRA step's saved
activations). `SiluMul` saves g and u and recomputes silu(g) in backward, one elementwise pass.
Values and gradients are bitwise those of the stock ops: the same torch kernels on the same inputs.

`use_lean_mlps(model)` gives the model's gated SiLU MLPs a forward through it (an instance
attribute `forward`, a `LeanForward`; `use_lean_mlps(model, False)` removes it). That forward
still calls gate_proj, up_proj and down_proj, so their hooks run; it calls `SiluMul` in place of
`act_fn` unless `act_fn` has hooks. It is the same forward in a first pass and in a gradient
checkpoint's recomputation, whoever checkpoints (transformers, torch.utils.checkpoint, FSDP).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import SiLUActivation

from .amp import custom_bwd, custom_fwd, first_order_only
from .hooks import bypassable

# Classes whose forward is exactly `down_proj(act_fn(gate_proj(x)) * up_proj(x))`;
# tests/test_swiglu.py checks each against its own forward.
GATED_MLPS = ("LlamaMLP", "MistralMLP", "Olmo2MLP", "Qwen2MLP", "Qwen2MoeMLP", "Qwen3MLP",
              "SmolLM3MLP")
SILU = (SiLUActivation, nn.SiLU)


class SiluMul(torch.autograd.Function):
    """silu(g) * u for g, u: (..., I) of one dtype; saves g, and u when g needs a gradient."""

    @staticmethod
    @custom_fwd
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, u if ctx.needs_input_grad[0] else None)  # grad_u needs g only
        return F.silu(g).mul_(u)

    @staticmethod
    @first_order_only  # no silent 2nd derivative (amp.first_order_only)
    @custom_bwd
    def backward(ctx, grad: torch.Tensor):
        g, u = ctx.saved_tensors
        need_g, need_u = ctx.needs_input_grad
        grad_u = F.silu(g).mul_(grad) if need_u else None
        grad_g = None
        if need_g:
            grad_silu = grad * u
            grad_g = torch.ops.aten.silu_backward.grad_input(grad_silu, g, grad_input=grad_silu)
        return grad_g, grad_u


class LeanForward:
    """The forward `use_lean_mlps` gives one MLP: `down(SiluMul(gate(x), up(x)))`. A plain
    object (not a bound method), so the model still deep-copies and pickles."""

    def __init__(self, mlp: nn.Module) -> None:
        self.mlp = mlp

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        g, u = mlp.gate_proj(x), mlp.up_proj(x)
        if g.dtype != u.dtype or not bypassable(mlp.act_fn, SILU):  # the stock ops
            return mlp.down_proj(mlp.act_fn(g) * u)
        return mlp.down_proj(SiluMul.apply(g, u))


def lean_mlps(model: nn.Module) -> list[nn.Module]:
    """The model's MLPs `use_lean_mlps` applies to: a class in `GATED_MLPS` with a SiLU `act_fn`
    and no forward of its own set on the instance (other than a `LeanForward`)."""
    return [m for m in model.modules() if type(m).__name__ in GATED_MLPS
            and isinstance(getattr(m, "act_fn", None), SILU)
            and isinstance(m.__dict__.get("forward", LeanForward(m)), LeanForward)]


def use_lean_mlps(model: nn.Module, on: bool = True) -> int:
    """Give the model's gated SiLU MLPs the lean forward (`on`) or their own back; returns how
    many MLPs that concerns."""
    mlps = lean_mlps(model)
    for mlp in mlps:
        if on:
            mlp.forward = LeanForward(mlp)
        else:
            mlp.__dict__.pop("forward", None)
    return len(mlps)
