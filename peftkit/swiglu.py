"""A SwiGLU MLP whose backward keeps two activations instead of three.

    out = down(silu(gate(x)) * up(x))        (Shazeer, 2020, arXiv:2002.05202)

Autograd on transformers' `down_proj(act_fn(gate_proj(x)) * up_proj(x))` saves g = gate(x),
u = up(x) and silu(g): three (N, I) tensors per layer (I the intermediate size, 1,536 in
SmolLM2: 36 MiB per layer at 2,048 tokens in fp32, the largest share of a LoRA step's saved
activations). `SiluMul` saves g and u and recomputes silu(g) in backward, one elementwise pass.
Values and gradients are bitwise those of the stock ops: the same torch kernels on the same inputs.

`lean_swiglu(model)` routes the model's gated SiLU MLPs through it while active; `peftkit train`
enters it for its training steps (see `peftkit/train/trainer.py`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F
from transformers.activations import SiLUActivation

from .reroute import checkpointing, rerouted

# Classes whose forward is exactly `down_proj(act_fn(gate_proj(x)) * up_proj(x))`;
# tests/test_swiglu.py checks each against its own forward.
GATED_MLPS = ("LlamaMLP", "MistralMLP", "Olmo2MLP", "Qwen2MLP", "Qwen2MoeMLP", "Qwen3MLP",
              "SmolLM3MLP")


class SiluMul(torch.autograd.Function):
    """silu(g) * u for g, u: (..., I) of one dtype; saves g, and u when g needs a gradient."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, u if ctx.needs_input_grad[0] else None)  # grad_u needs g only
        return F.silu(g).mul_(u)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        g, u = ctx.saved_tensors
        need_g, need_u = ctx.needs_input_grad
        grad_u = F.silu(g).mul_(grad) if need_u else None
        grad_g = None
        if need_g:
            grad_silu = grad * u
            grad_g = torch.ops.aten.silu_backward.grad_input(grad_silu, g, grad_input=grad_silu)
        return grad_g, grad_u


def _lean_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    g, u = mlp.gate_proj(x), mlp.up_proj(x)
    if g.dtype != u.dtype:  # mixed dtypes: the stock ops, with their type promotion
        return mlp.down_proj(mlp.act_fn(g) * u)
    return mlp.down_proj(SiluMul.apply(g, u))


def lean_mlps(model: nn.Module) -> list[nn.Module]:
    """The model's MLPs `lean_swiglu` reroutes: a class in `GATED_MLPS` with a SiLU `act_fn`.
    None under gradient checkpointing (`reroute.checkpointing`): a checkpointed layer saves no MLP
    activation anyway."""
    if checkpointing(model):
        return []
    return [m for m in model.modules() if type(m).__name__ in GATED_MLPS
            and isinstance(getattr(m, "act_fn", None), (SiLUActivation, nn.SiLU))
            and "forward" not in m.__dict__]


def lean_swiglu(model: nn.Module) -> contextlib.AbstractContextManager:
    """While active, the model's gated SiLU MLPs compute through `SiluMul`."""
    return rerouted(lean_mlps(model), _lean_forward)
