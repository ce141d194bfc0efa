"""Autocast for custom autograd functions on whatever device their inputs live.

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
