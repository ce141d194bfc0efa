"""The rows `peftkit compare` can train: every registered method under its own name, and named
presets (a base method plus extra `peftkit train` options), e.g. dora = lora + `--use-dora`.

A preset takes its base method's learning rate and compare settings; its own options go on top.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..methods import registry


@dataclass(frozen=True)
class Variant:
    name: str
    method: str  # the `peftkit train --method`
    flags: dict[str, Any] = field(default_factory=dict)  # on top of the method's compare flags
    note: str = ""


PRESETS: dict[str, Variant] = {v.name: v for v in (
    Variant("lora-all", "lora", {"target_modules": "all-linear"},
            "LoRA on every linear layer but the head"),
    Variant("rslora", "lora", {"use_rslora": True}, "scaling alpha/sqrt(r) (Kalajdzievski, 2023)"),
    Variant("dora", "lora", {"use_dora": True}, "weight-decomposed LoRA (Liu et al., 2024)"),
    Variant("loraplus", "lora", {"loraplus_lr_ratio": 16},
            "B's learning rate 16x A's (Hayou et al., 2024)"),
    Variant("pissa", "lora", {"init_lora_weights": "pissa"},
            "A, B from the principal singular vectors (Meng et al., 2024)"),
    Variant("olora", "lora", {"init_lora_weights": "olora"},
            "A, B from a QR decomposition (Büyükakyüz, 2024)"),
)}


def all_variants() -> dict[str, Variant]:
    """Row name -> variant: each method as itself, followed by its presets."""
    return {v.name: v for m in registry.SPECS
            for v in [Variant(m, m), *(p for p in PRESETS.values() if p.method == m)]}


def get(name: str, where: str) -> Variant:
    found = all_variants().get(name)
    if found is None:
        raise ValueError(f"{where}: unknown method {name!r}; choose one of "
                         f"{', '.join(all_variants())}")
    return found


def available(variant: Variant) -> bool:
    """Whether this `peftkit train` has every option the variant sets."""
    known = registry.spec(variant.method).flags
    return all(name in known for name in variant.flags)


def default_names() -> list[str]:
    """The default `--methods`: every method and every preset this `peftkit train` can run."""
    return [name for name, v in all_variants().items() if available(v)]


def flags(variant: Variant, extra: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run's `peftkit train` options: the base method's learning rate and compare flags, the
    user's overrides for the base method, the preset's own options (an override of the base
    method never undoes what makes the preset: `--set lora.target_modules=q_proj` leaves
    lora-all on every linear layer), then the user's overrides for the row itself."""
    spec = registry.spec(variant.method)
    out = {"learning_rate": spec.learning_rate, **spec.compare_flags,
           **extra.get(variant.method, {}), **variant.flags}
    if variant.name != variant.method:
        out.update(extra.get(variant.name, {}))
    return out
