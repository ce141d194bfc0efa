"""PEFT's `modules_to_save`: a full trainable copy of a module per adapter."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import mixed, targets
from .base import TunerLayer, replace_module


class ModulesToSaveWrapper(TunerLayer):
    """A full trainable copy of a module per adapter (PEFT's `modules_to_save`).

    The copy of adapter `name` lives at `modules_to_save.<name>`; on disk its tensors keep the
    module's own keys (`<path>.weight`), as in PEFT. Forward runs the first active adapter's copy;
    `merge_and_unload` keeps the first merged adapter's copy (PEFT 0.21 keeps the active one's even
    when merging other adapters). In a mixed-adapter batch (`peftkit.mixed`) each row goes
    through its adapter's copy (the original module for `"__base__"` and adapters without one).
    """

    mixes_rows = True

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.merged_adapters: list[str] = []

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        return dict(self.modules_to_save[name].named_parameters())

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]

    def _current(self) -> nn.Module:
        if self.disabled or not self.active_adapters:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]

    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        """Nothing to fold; remember which of `names` have a copy here, for `unwrap`."""
        self.merged_adapters += [n for n in names
                                 if n in self.modules_to_save and n not in self.merged_adapters]

    def unmerge(self) -> None:
        self.merged_adapters = []

    def unwrap(self, merge: bool) -> nn.Module:
        if merge and self.merged_adapters:
            return self.modules_to_save[self.merged_adapters[0]]
        return self.original_module

    def forward(self, *args, **kwargs):
        rows = mixed.current()
        if rows is None or self.disabled:
            return self._current()(*args, **kwargs)
        return self._mixed_forward(rows, *args, **kwargs)

    def _mixed_forward(self, rows: mixed.MixedRows, x: torch.Tensor, *args, **kwargs):
        """x (B, ...): each distinct adapter's rows through its module, put back in row order."""
        rows.check_batch(x.shape[0])
        outs, order = [], []
        for name, idx in rows.groups(x.device):
            module = self.modules_to_save[name] if name in self.modules_to_save \
                else self.original_module
            outs.append(module(x.index_select(0, idx), *args, **kwargs))
            order.append(idx)
        out = torch.cat(outs)
        return out.new_empty(out.shape).index_copy_(0, torch.cat(order), out)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._current(), name)


def add_modules_to_save(model: nn.Module, names: list[str] | None, adapter: str,
                        wrapper: type[ModulesToSaveWrapper] = ModulesToSaveWrapper) -> None:
    """Wrap each module whose path equals or ends with `.<entry>` (in a `wrapper`) and give it a
    copy for `adapter`."""
    for path, module in list(model.named_modules()):
        if not names or not targets.matches_list(path, names):
            continue
        if not isinstance(module, ModulesToSaveWrapper):
            if isinstance(module, TunerLayer):
                continue
            module = wrapper(module)
            replace_module(model, path, module)
        module.add(adapter)
