"""Mixed-adapter batches: a different adapter for each row of one batch, at inference.

`model(input_ids, adapter_names=["a", "b", "__base__", "a"])` runs row i with adapter
`adapter_names[i]` as if it ran alone (`"__base__"`: the bare model; after a LoRA init that
changes the base, PiSSA or OLoRA, the residual base, as in PEFT), as Hugging Face PEFT's
`adapter_names` does (its `LoraLayer._mixed_batch_forward`; multi-LoRA serving as in S-LoRA,
Sheng et al., 2023, arXiv:2311.03285). The names travel in a context variable set by
`PeftModel.forward` / `generate` for the length of the call, so every layer of the model's own
forward and of `generate`'s steps sees them; a layer reads them with `current()`.

Cost follows the number of distinct adapters, not rows: a LoRA layer computes the base output
y (B, T, out) once for the whole batch, then for each distinct adapter gathers its n rows of x
(`index_select`, (n, T, in)), runs that adapter's branch on them alone and writes them back into
y (`index_copy_`), with the arithmetic of the single-adapter forward.

Refused, with a ValueError saying what to do (PEFT refuses the first four too): training mode,
names not loaded, a name count that differs from the batch, adapters merged into the weights,
and adapters of methods whose layers cannot serve rows differently (`TunerLayer.mixes_rows`
False: prompt tuning, which lengthens every row, IA3, bottleneck adapters), named in the list or
active (they would apply to every row). DoRA adapters mix (PEFT 0.21 refuses them).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:
    from .model import PeftModel

BASE = "__base__"

_ROWS: contextvars.ContextVar["MixedRows | None"] = contextvars.ContextVar("peftkit_mixed_rows",
                                                                          default=None)


class MixedRows:
    """The adapter name of each row of the running call, and the rows of each distinct name."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self._groups: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}

    def groups(self, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """[(name, row indices as a long tensor on `device`)] in order of first appearance;
        built once per call and device, then shared by every layer."""
        if device not in self._groups:
            rows: dict[str, list[int]] = {}
            for i, name in enumerate(self.names):
                rows.setdefault(name, []).append(i)
            self._groups[device] = [(name, torch.tensor(idx, dtype=torch.long, device=device))
                                    for name, idx in rows.items()]
        return self._groups[device]

    def check_batch(self, batch: int) -> None:
        if batch != len(self.names):
            raise ValueError(
                f"adapter_names has {len(self.names)} names but the batch has {batch} rows: pass "
                "one adapter name per row ('__base__' for the base model)")


def current() -> MixedRows | None:
    """The rows of the running mixed-adapter call, None outside one."""
    return _ROWS.get()


@contextlib.contextmanager
def rows(model: "PeftModel", names: list[str], repeat: int = 1) -> Iterator[None]:
    """Check `names` against `model` (see the module docstring) and run the body with each name
    repeated `repeat` times in place (`generate` expands every row into its beams or returned
    sequences that way)."""
    check(model, names)
    token = _ROWS.set(MixedRows([n for n in names for _ in range(repeat)]))
    try:
        yield
    finally:
        _ROWS.reset(token)


def check(model: "PeftModel", names: list[str]) -> None:
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"adapter_names must be a list of adapter names, one per row "
                         f"('__base__' for the base model), got {names!r}")
    if model.training:
        raise ValueError("adapter_names works in inference only (as in PEFT) and the model is in "
                         "training mode: call model.eval() first")
    unknown = sorted(set(names) - set(model.peft_config) - {BASE})
    if unknown:
        raise ValueError(f"adapter_names has adapters that are not loaded: {unknown}; loaded: "
                         f"{sorted(model.peft_config)} (and '__base__' for the base model)")
    for layer in model._layers():
        if layer.mixes_rows:
            continue
        named = [n for n in dict.fromkeys(names) if n in layer.adapter_names]
        active = [] if layer.disabled else layer.active_adapters
        for name in named + active:
            method = model.peft_config[name].peft_type.value
            fix = (f"run its rows in a batch of their own (set_adapter({name!r}))" if name in named
                   else "it is the active adapter and would apply to every row: set_adapter() to "
                        "a LoRA adapter first")
            raise ValueError(
                f"adapter {name!r} is a {method} adapter, whose layers "
                f"({type(layer).__name__}) cannot serve different adapters to the rows of one "
                f"batch; adapter_names mixes LoRA adapters (with their modules_to_save): {fix}")
