"""DoRA's branch (Liu et al., 2024, arXiv:2402.09353) as one autograd function that saves only
what its backward needs; the DoRA counterpart of `lora_fn.LoraFunction`.

With y = base_layer(x) computed outside, f = m / n (out,) where n = ||W0 + s * B @ A||_row is
detached (paper section 4.3; PEFT detaches it too) and computed by the caller, and x_d the
dropped input (x when p = 0):

    base = y - bias                    (p = 0: W0 x read off y, as PEFT does)
         = x_d @ W0^T                  (p > 0: PEFT recomputes W0 x on the dropped x)
    out  = y + (f - 1) * base + f * s * (x_d @ A^T @ B^T)

Autograd through that expression (PEFT's way) keeps, per adapted layer, the dropout's mask and
x_d (N, in), A x_d (N, r), B A x_d (N, out), f * B A x_d (N, out), base (N, out), and with
dropout also x_d again for the base matmul. This function keeps x itself (shared with the other
projections of the same input), h = x_d @ A^T (N, r), the keep-mask as bits, and base (N, out):
one (N, out) tensor, the least the magnitude's gradient needs. With z = base + s * (h @ B^T):

    grad_m    = sum_N(g * z) / n       (p > 0: base saved as (1 - p) W0 x_d, the division here)
              = (sum_N(g * base) + s * rowsum(B * (g^T h))) / n      (no (N, out) product of h)
    grad_B    = (g^T h) * (s * f)[:, None]                            (out, r)
    gh        = g @ (B * (s * f)[:, None]) / (1 - p)                  (N, r)
    grad_A    = gh^T @ (x * mask)                                     (r, in)
    grad_x    = gh @ A                         (p = 0; W0's part flows through grad_y)
              = (gh @ A + g @ (W0 * (f - 1)[:, None] / (1 - p))) * mask        (p > 0)
    grad_y    = f * g (p = 0, base taken from y);  g (p > 0)
    grad_bias = -sum_N(g) * (f - 1)            (p = 0, only when the bias trains)

so the only (N, out) elementwise work in backward is sum_N(g * base) (and f * g for p = 0), in
forward one multiply-add; the scalings by f, s and 1 / (1 - p) go on (out, r) or (out, in)
weights, (N, r) tensors or the (out,) factor. PEFT rounds (f * lora) * s, this function
f * s * B first: the same value up to fp32 rounding. Extra matmuls against
LoRA: none with p = 0; with p > 0, W0 x_d forward and its transpose in backward, which PEFT's
semantics (the dropped x through W0) require.

The math runs in the adapters' dtype, the result is cast to y's dtype. The dropout mask is
`lora_fn.keep_mask`'s. Under autocast the backward runs under the forward's autocast state.
"""

from __future__ import annotations

import torch

from .amp import custom_bwd, custom_fwd, first_order_only
from .lora_fn import _mask_, _masked, keep_mask, pack_bits, unpack_bits


class DoraFunction(torch.autograd.Function):
    """See the module docstring. y: (..., out); x: (..., in); weight_a (r, in), weight_b (out, r),
    magnitude (out,) in the adapter dtype; norm (out,) detached; weight: W0 (out, in) in the
    adapter dtype, used only when dropout_p > 0 (else None); bias: the base layer's (out,) or
    None. Returns (..., out) in y's dtype."""

    @staticmethod
    @custom_fwd
    def forward(ctx, y, x, weight_a, weight_b, magnitude, norm, weight, bias, scaling: float,
                dropout_p: float):
        dtype = weight_a.dtype
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.reshape(-1, y.shape[-1])
        f = magnitude.detach() / norm
        b_scaled = weight_b * (f * scaling)[:, None]  # f * s folded into B: (out, r)
        packed = None
        if dropout_p > 0:
            keep = keep_mask(x2.shape, dropout_p, x.device)
            packed = pack_bits(keep)
            xk = _masked(x2, keep, dtype)  # x * mask; 1 / (1 - p) goes on (N, r) and (out,)
            h = (xk @ weight_a.t()).mul_(1 / (1 - dropout_p))
            base = xk @ weight.to(dtype).t()  # (1 - p) * W0 x_d, saved as is
            del xk
            # y + (f - 1) * W0 x_d, then + (f * s) * B A x_d as one addmm
            out = torch.addcmul(y2.to(dtype), base, ((f - 1) / (1 - dropout_p)))
        else:
            h = x2.to(dtype) @ weight_a.t()
            base = (y2 if bias is None else y2 - bias).to(dtype)
            out = torch.addcmul(y2.to(dtype), base, f - 1)
        out = out.addmm_(h, b_scaled.t()).to(y.dtype)
        ctx.save_for_backward(x, h, weight_a, weight_b, f, norm, base, packed,
                              weight if dropout_p > 0 else None)
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.view(*y.shape[:-1], out.shape[-1])

    @staticmethod
    @first_order_only  # saved tensors are constants to autograd: no 2nd derivative
    @custom_bwd
    def backward(ctx, grad_out):
        x, h, weight_a, weight_b, f, norm, base, packed, weight = ctx.saved_tensors
        need_y, need_x, need_a, need_b, need_m = ctx.needs_input_grad[:5]
        need_bias = ctx.needs_input_grad[7]
        s, p = ctx.scaling, ctx.dropout_p
        x2 = x.reshape(-1, x.shape[-1])
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(weight_b.dtype)
        grad_y = grad_x = grad_a = grad_b = grad_m = grad_bias = None
        if need_b or need_m:
            gth = g.t() @ h.to(g.dtype)  # (out, r)
            if need_b:
                grad_b = (gth * (s * f)[:, None]).to(weight_b.dtype)
            if need_m:
                grad_m = (g * base).sum(0).div_(1 - p).add_((gth * weight_b).sum(1), alpha=s)
                grad_m = grad_m.div_(norm)
        if need_x or need_a:
            gh = g @ (weight_b * (s * f / (1 - p))[:, None])  # (N, r)
            keep = unpack_bits(packed, x2.shape) if p > 0 else None
            if need_a:
                d = x2.to(weight_a.dtype) if keep is None else _masked(x2, keep, weight_a.dtype)
                grad_a = (gh.t() @ d).to(weight_a.dtype)
                del d
            if need_x:
                gx = gh @ weight_a
                if keep is not None:
                    w = weight.to(g.dtype) * ((f - 1) / (1 - p))[:, None]  # (out, in)
                    gx.addmm_(g, w)
                    _mask_(gx, keep)
                grad_x = gx.to(x.dtype).view(x.shape)
        if need_y:
            grad_y = grad_out if p > 0 else (g * f).to(grad_out.dtype).view(grad_out.shape)
        if need_bias and p == 0:
            grad_bias = (g.sum(0) * (1 - f)).to(ctx.bias_dtype)
        if grad_m is not None:
            grad_m = grad_m.to(f.dtype)
        return grad_y, grad_x, grad_a, grad_b, grad_m, None, None, grad_bias, None, None


def dora_forward(y: torch.Tensor, x: torch.Tensor, weight_a: torch.Tensor,
                 weight_b: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor,
                 weight: torch.Tensor | None, bias: torch.Tensor | None, scaling: float,
                 dropout_p: float) -> torch.Tensor:
    """`DoraFunction`; `dropout_p` 0 when not training (then `weight` is not read)."""
    return DoraFunction.apply(y, x, weight_a, weight_b, magnitude, norm, weight, bias, scaling,
                              dropout_p)
