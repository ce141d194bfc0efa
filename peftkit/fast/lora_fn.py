"""The LoRA branch as one autograd function that saves only what its backward needs.

    out = y + scaling * (dropout(x) @ A^T) @ B^T

with y = base_layer(x) computed outside (any base: nn.Linear, Conv1D, a k-bit linear).

Written with autograd ops (Hugging Face PEFT's way), a LoRA layer with dropout keeps, for every
adapted module, the dropout's float mask and the dropped copy of x (two (N, in) tensors in the
adapter dtype), even when q, k and v share the same x. This function keeps instead:

- x itself (the tensor the caller already holds; q, k and v share it, so no copy),
- h = (x * mask) @ A^T / (1 - p), shape (N, r), small,
- the keep-mask as packed bits, (N * in) / 8 bytes, only when dropout is active,
- A and B (the parameters themselves).

The dropout's rescaling 1 / (1 - p) is applied to (N, r) tensors, never to (N, in) ones.
Backward (g: (N, out), the gradient of out; mask = 1 everywhere when p = 0):

    grad_y = g
    grad_B = scaling * g^T @ h                         (out, r)
    gh     = scaling / (1 - p) * g @ B                 (N, r)
    grad_A = gh^T @ (x * mask)                         (r, in)
    grad_x = (gh @ A) * mask                           (N, in); autograd adds the base's part

The LoRA math runs in the adapters' dtype (fp32 by default, also for a bf16/fp16 base), the result
is cast back to y's dtype: the same arithmetic as PEFT's `base(x) + B(A(dropout(x))) * scaling`.
The dropout mask is drawn by `keep_mask`, reproducibly under `torch.manual_seed`.

On CPU the mask work runs in numpy: drawing and bit-packing always, `x * mask` (forward and
backward) and `grad_x *= mask` for fp32/fp64 tensors, one vectorized pass each, where torch's
bool-times-float kernels take a per-element casting path (docs/benchmarks.md). Elsewhere (CUDA,
bf16 or fp16 tensors) torch ops. Under autocast the backward runs under the forward's autocast
state (`amp.custom_fwd` / `custom_bwd`), as autograd's own ops do.

`LoraLinear.forward` (peftkit/methods/lora.py) calls its submodules `B(A(dropout(x)))`; it takes
this function instead only where `fusable` says that skips nothing (see `hooks.bypassable`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .amp import custom_bwd, custom_fwd, first_order_only
from .hooks import bypassable

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bool tensor of `shape`, each element True (kept) with probability 1 - p, independently.

    An element is dropped when a uniform 32-bit integer u is below t = round(p * 2**32), so the
    drop probability is t / 2**32, p within 2**-33. On CPU u is drawn in two parts from numpy's
    PCG64, seeded by a draw from torch's default generator (so `torch.manual_seed` fixes it):
    its top byte for every element, which decides unless it equals the top byte of t (1 element
    in 256), and its low 24 bits only for those ties. That is the same Bernoulli(t / 2**32) draw
    at a quarter of the random bits, which is what makes it cheaper than torch's `bernoulli_` on
    CPU. Elsewhere torch's `bernoulli_`.
    """
    if torch.device(device).type != "cpu" or torch.compiler.is_compiling():
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1 - p)
    rng = np.random.PCG64(int(torch.randint(0, 2**62, ()).item()))
    n = shape.numel()
    top, low = divmod(round(p * 2**32), 2**24)
    top_bytes = rng.random_raw((n + 7) // 8).view(np.uint8)[:n]
    keep = top_bytes > top
    ties = np.flatnonzero(top_bytes == top)
    keep[ties] = (rng.random_raw(ties.size) & (2**24 - 1)) >= low
    return torch.from_numpy(keep).view(shape)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor of n elements -> uint8 tensor of ceil(n / 8) bytes (little-endian bits).

    On CPU numpy packs in one pass (much faster than torch ops there); elsewhere torch ops."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.packbits(mask.reshape(-1).numpy(), bitorder="little"))
    return _pack_bits_torch(mask)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of `pack_bits`: the bool tensor of `shape`."""
    if packed.device.type == "cpu":
        bits = np.unpackbits(packed.numpy(), count=shape.numel(), bitorder="little")
        return torch.from_numpy(bits.view(np.bool_)).view(shape)
    return _unpack_bits_torch(packed, shape)


def _pack_bits_torch(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    bits = torch.nn.functional.pad(flat.to(torch.uint8), (0, pad)).view(-1, 8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    return (bits * weights).sum(-1, dtype=torch.uint8)


def _unpack_bits_torch(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    n = shape.numel()
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    return (packed.unsqueeze(-1) & weights).ne(0).view(-1)[:n].view(shape)


class LoraFunction(torch.autograd.Function):
    """`out = y + scaling * (dropout_p(x) @ A^T) @ B^T`; see the module docstring.

    y: (..., out) any float dtype; x: (..., in); weight_a: (r, in); weight_b: (out, r), both in
    the adapter dtype. Returns (..., out) in y's dtype.
    """

    @staticmethod
    @custom_fwd
    def forward(ctx, y, x, weight_a, weight_b, scaling: float, dropout_p: float):
        x2 = x.reshape(-1, x.shape[-1])
        packed = None
        if dropout_p > 0:
            keep = keep_mask(x2.shape, dropout_p, x.device)
            packed = pack_bits(keep)
            h = _masked(x2, keep, weight_a.dtype) @ weight_a.t()
            h.mul_(1 / (1 - dropout_p))  # the dropout's rescaling, on (N, r) instead of (N, in)
        else:
            h = x2.to(weight_a.dtype) @ weight_a.t()
        y2 = y.reshape(-1, y.shape[-1]).to(weight_b.dtype)
        if torch.is_autocast_enabled(y.device.type):  # autocast would round y in addmm
            out = y2.add(h @ weight_b.t(), alpha=scaling).to(y.dtype)
        else:
            out = torch.addmm(y2, h, weight_b.t(), alpha=scaling).to(y.dtype)
        ctx.save_for_backward(x, h, weight_a, weight_b, packed)
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        return out.view(*y.shape[:-1], out.shape[-1])

    @staticmethod
    @first_order_only  # saved tensors are constants to autograd: no 2nd derivative
    @custom_bwd
    def backward(ctx, grad_out):
        x, h, weight_a, weight_b, packed = ctx.saved_tensors
        need_y, need_x, need_a, need_b = ctx.needs_input_grad[:4]
        scaling, p = ctx.scaling, ctx.dropout_p
        x2 = x.reshape(-1, x.shape[-1])
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(weight_b.dtype)
        grad_x = grad_a = grad_b = None
        if need_b:
            grad_b = (g.t() @ h.to(g.dtype)).mul_(scaling)  # h is low precision under autocast
        if need_x or need_a:
            # gh = d out / d (dropped x @ A^T), with the dropout's rescaling folded in: (N, r)
            gh = (g @ weight_b).mul_(scaling / (1 - p))
            keep = unpack_bits(packed, x2.shape) if p > 0 else None
            buffer = None
            if need_a:
                d = x2.to(weight_a.dtype) if keep is None else _masked(x2, keep, weight_a.dtype)
                grad_a = gh.t() @ d
                # a fresh (N, in) tensor of grad_x's dtype (not under autocast), reusable
                reusable = keep is not None and not torch.is_autocast_enabled(d.device.type)
                buffer = d if reusable else None
            if need_x:
                gx = torch.mm(gh, weight_a, out=buffer) if buffer is not None else gh @ weight_a
                if keep is not None:
                    _mask_(gx, keep)
                grad_x = gx.to(x.dtype).view(x.shape)
        grad_y = grad_out if need_y else None
        if grad_a is not None:  # under autocast the matmuls return its dtype
            grad_a = grad_a.to(weight_a.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(weight_b.dtype)
        return grad_y, grad_x, grad_a, grad_b, None, None


def _numpy_ok(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def _masked(x2: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x2 * keep as a new tensor in `dtype`."""
    if x2.dtype != dtype:
        return _mask_(x2.to(dtype), keep)
    if not _numpy_ok(x2):
        return x2 * keep
    out = torch.empty(x2.shape, dtype=dtype)
    np.multiply(x2.detach().numpy(), keep.numpy(), out=out.numpy())
    return out


def _mask_(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """t *= keep in place; returns t."""
    if _numpy_ok(t):
        np.multiply(t.numpy(), keep.numpy(), out=t.numpy())
        return t
    return t.mul_(keep)


def fusable(lora_a: nn.Module, lora_b: nn.Module, dropout: nn.Module) -> bool:
    """Whether `lora_forward` computes `B(A(dropout(x)))` of these modules and skips nothing:
    plain `nn.Linear` A and B without bias, `nn.Dropout` or `nn.Identity`, no hooks."""
    return (bypassable(lora_a, nn.Linear) and bypassable(lora_b, nn.Linear)
            and lora_a.bias is None and lora_b.bias is None
            and bypassable(dropout, (nn.Dropout, nn.Identity)))


def lora_forward(y: torch.Tensor, x: torch.Tensor, weight_a: torch.Tensor,
                 weight_b: torch.Tensor, scaling: float, dropout_p: float) -> torch.Tensor:
    """y + scaling * B(A(dropout(x))) through `LoraFunction`; `dropout_p` 0 when not training."""
    return LoraFunction.apply(y, x, weight_a, weight_b, scaling, dropout_p)
