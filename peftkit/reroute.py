"""Routing chosen modules' forward through another function while a context is active.

`swiglu.lean_swiglu` and `frozen_linear.frozen_linears` use it for `peftkit train`'s training
forwards: an instance attribute `forward` shadows the class's method, and deleting it restores
the module exactly (also when the body raises).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from torch import nn


def checkpointing(model: nn.Module) -> bool:
    """Whether a submodule of `model` has transformers' gradient checkpointing on. A recomputed
    layer must save what its first forward saved, and the recomputation runs in backward, outside
    any context: rerouting a checkpointed model would fail its backward with a CheckpointError."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


@contextlib.contextmanager
def rerouted(modules: list[nn.Module], forward: Callable) -> Iterator[None]:
    """While active, `module(...)` calls `forward(module, ...)` for each of `modules`."""
    for module in modules:
        module.forward = forward.__get__(module)
    try:
        yield
    finally:
        for module in modules:
            del module.forward
