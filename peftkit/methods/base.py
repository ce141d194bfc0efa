"""The protocol every method implements: its layers (`TunerLayer`) and its `Injector`.

A method's `Injector` puts `TunerLayer`s into a model (the base of every method's layer; PEFT's
`BaseTunerLayer`). Each layer holds its adapters in dicts keyed by adapter name, so adding,
switching, disabling, merging and deleting adapters is one mechanism shared by all methods. Each layer also names its own tensors for adapter files: the on-disk key is
`base_model.model.<layer path>.<local key>`, exactly PEFT's. Trainable parameters are the tensors
layers return from `adapter_tensors` (plus a method's `extra_tensors`), never guessed from names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from ..config import PeftConfig


class TunerLayer(nn.Module):
    """A module that holds adapters by name and applies the active, enabled ones.

    `mixes_rows`: its forward serves each row the adapter `peftkit.mixed.current()` names, in a
    mixed-adapter batch (`model(..., adapter_names=[...])`); layers that cannot are refused there.
    """

    mixes_rows = False

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


class Injector:
    """How a PEFT method adds adapter `name` to a model; its `MethodSpec` (`methods.spec`) names
    it, with the config class it reads."""

    def inject(self, model: nn.Module, config: "PeftConfig", name: str,
               autocast_adapter_dtype: bool = True) -> None:
        """Add adapter `name` to `model` in place (wrapping or hooking modules). New tensors are
        fp32 when `autocast_adapter_dtype`, else in the base model's float dtype."""
        raise NotImplementedError

    def extra_tensors(self, model: nn.Module, config: "PeftConfig") -> dict[str, nn.Parameter]:
        """Trainable tensors of the base model that belong to the adapter (e.g. LoRA biases)."""
        return {}


def replace_module(model: nn.Module, path: str, new: nn.Module | None) -> None:
    """Put `new` at `path` in `model`; `None` deletes the module there."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if new is None:
        delattr(parent, child)
    else:
        setattr(parent, child, new)
