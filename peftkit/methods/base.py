"""The protocol every method implements, and the method registry.

A method injects `TunerLayer`s into a model. Each layer holds its adapters in dicts keyed by
adapter name, so adding, switching, disabling, merging and deleting adapters is one mechanism
shared by all methods. Each layer also names its own tensors for adapter files: the on-disk key is
`base_model.model.<layer path>.<local key>`, exactly PEFT's. Trainable parameters are the tensors
layers return from `adapter_tensors` (plus a method's `extra_tensors`), never guessed from names.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from ..config import PeftConfig


class TunerLayer(nn.Module):
    """A module that holds adapters by name and applies the active, enabled ones."""

    def __init__(self) -> None:
        super().__init__()
        self.active_adapters: list[str] = []
        self.disabled = False

    @property
    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        """`{local on-disk key: parameter}` of adapter `name` in this layer."""
        raise NotImplementedError

    def file_key(self, path: str, key: str) -> str:
        """The file key of local key `key` for this layer at `path` (PEFT's rule: the module
        path, a dot, the local key). A method whose files use global keys overrides it."""
        return f"{path}.{key}"

    def delete_adapter(self, name: str) -> None:
        raise NotImplementedError

    def set_adapter(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapter_names]

    def set_disabled(self, disabled: bool) -> None:
        self.disabled = disabled

    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} adapters cannot be folded into the base weights"
        )

    def unmerge(self) -> None:
        """Undo `merge`; a no-op when nothing is merged."""

    def unwrap(self, merge: bool) -> nn.Module | None:
        """The plain module that replaces this layer in `unload`/`merge_and_unload`; None removes
        the layer (for layers added next to the model's own modules rather than around one)."""
        raise NotImplementedError


class WrappedLayer(TunerLayer):
    """An adapter layer around one base module (`base_layer`) whose adapters can be folded into
    the base weight: `merged_adapters` lists those folded in, in order. Disabling unmerges first
    (the base output must then be the original one); unloading returns the base module, merged
    or restored."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.merged_adapters: list[str] = []

    @property
    def weight(self):
        return self.base_layer.weight

    def set_disabled(self, disabled: bool) -> None:
        if disabled:
            self.unmerge()
        self.disabled = disabled

    def unwrap(self, merge: bool) -> nn.Module:
        if not merge:
            self.unmerge()
        return self.base_layer


class ModulesToSaveWrapper(TunerLayer):
    """A full trainable copy of a module per adapter (PEFT's `modules_to_save`).

    The copy of adapter `name` lives at `modules_to_save.<name>`; on disk its tensors keep the
    module's own keys (`<path>.weight`), as in PEFT. Forward runs the first active adapter's copy;
    `merge_and_unload` keeps the first merged adapter's copy (PEFT 0.21 keeps the active one's even
    when merging other adapters).
    """

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
        return self._current()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._current(), name)


class Method:
    """What a PEFT method supplies: its config class and how to inject adapter `name`."""

    config_cls: type["PeftConfig"]

    def inject(self, model: nn.Module, config: "PeftConfig", name: str,
               autocast_adapter_dtype: bool = True) -> None:
        """Add adapter `name` to `model` in place (wrapping or hooking modules). New tensors are
        fp32 when `autocast_adapter_dtype`, else in the base model's float dtype."""
        raise NotImplementedError

    def extra_tensors(self, model: nn.Module, config: "PeftConfig") -> dict[str, nn.Parameter]:
        """Trainable tensors of the base model that belong to the adapter (e.g. LoRA biases)."""
        return {}


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    METHODS[method.config_cls.PEFT_TYPE.value] = method
    return method


def method_for(config: "PeftConfig") -> Method:
    try:
        return METHODS[config.peft_type.value]
    except KeyError:
        raise ValueError(f"no peftkit method is registered for {config.peft_type.value}") from None


def replace_module(model: nn.Module, path: str, new: nn.Module | None) -> None:
    """Put `new` at `path` in `model`; `None` deletes the module there."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if new is None:
        delattr(parent, child)
    else:
        setattr(parent, child, new)


def add_modules_to_save(model: nn.Module, names: list[str] | None, adapter: str,
                        wrapper: type[ModulesToSaveWrapper] = ModulesToSaveWrapper) -> None:
    """Wrap each module whose path equals or ends with `.<entry>` (in a `wrapper`) and give it a
    copy for `adapter`."""
    from .. import targets

    for path, module in list(model.named_modules()):
        if not names or not targets.matches_list(path, names):
            continue
        if not isinstance(module, ModulesToSaveWrapper):
            if isinstance(module, TunerLayer):
                continue
            module = wrapper(module)
            replace_module(model, path, module)
        module.add(adapter)
