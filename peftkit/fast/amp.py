"""Decorators for the speed layer's custom autograd functions: autocast on whatever device their
inputs live, and no silent second derivative.

`torch.amp.custom_fwd` / `custom_bwd` make a function's backward run under the autocast state its
forward saw, but each fixes one device type when the class is defined. The speed layer's
functions run on CPU and CUDA alike, so these wrappers apply torch's decorators per call, with
the device type of the first tensor argument.
"""

from __future__ import annotations

import functools

import torch


def custom_fwd(forward):
    """`torch.amp.custom_fwd(forward, device_type=<device of the first tensor argument>)`."""

    @functools.wraps(forward)
    def wrapped(ctx, *args):
        ctx.device_type = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        return torch.amp.custom_fwd(forward, device_type=ctx.device_type)(ctx, *args)

    return wrapped


def custom_bwd(backward):
    """`torch.amp.custom_bwd(backward, device_type=<the device type forward saw>)`."""

    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        return torch.amp.custom_bwd(backward, device_type=ctx.device_type)(ctx, *grads)

    return wrapped


def first_order_only(backward):
    """For a backward that reads gradients or activations its forward saved: they are constants to
    autograd, so a derivative of its result (`create_graph=True`, then a second `grad`) would
    silently miss their dependence on the inputs. torch's `once_differentiable` guards only when
    an incoming gradient requires grad, and its error node hangs off detached copies that a
    second `grad` with respect to the inputs never reaches. So this raises as soon as the
    backward is asked to build a graph (`create_graph=True`, grad mode on in backward), naming
    the switch that gives the stock, twice-differentiable computation."""

    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        if torch.is_grad_enabled():
            name = type(ctx).__name__.removesuffix("Backward")
            raise RuntimeError(
                f"{name} (peftkit's speed layer) has no second derivative, so it refuses "
                "create_graph=True; for higher-order gradients use the stock computation: "
                "peftkit.fast.apply(model, loss=False, lora_function=False)")
        return backward(ctx, *grads)

    return wrapped
