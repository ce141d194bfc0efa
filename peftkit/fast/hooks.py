"""Whether a fused path may bypass a module's `__call__`.

A fused path reads a module's parameters instead of calling it. That skips the module's hooks:
ZeRO-3 gathers parameters in a pre-forward hook, FSDP2 unshards in one (and swaps the module's
class), users probe activations with them. So the speed layer fuses only modules of the exact
stock class with no hooks of their own and no global module hooks; anything else takes the stock
path, which calls the modules.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _module

_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
_LOCAL_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def bypassable(module: nn.Module, cls: type | tuple[type, ...]) -> bool:
    """`module` is exactly of class `cls` (one of them) and calling it runs no hook."""
    classes = cls if isinstance(cls, tuple) else (cls,)
    return (type(module) in classes
            and not any(getattr(module, name, None) for name in _LOCAL_HOOKS)
            and not any(getattr(_module, name, None) for name in _GLOBAL_HOOKS))
