"""Parameter and memory estimates before training (`peftkit estimate`).

    estimate("llama-2-7b", "lora", {"r": 16, "target_modules": [...]}, Settings(batch_size=2))

returns the exact trainable/total parameter counts (`params`, on the meta device) and the memory
plan (`memory`, `activations`, `nf4`). Known architectures: `architectures.KNOWN`; methods:
`methods.METHODS`.
"""

from __future__ import annotations

import dataclasses

from .architectures import KNOWN, load_config
from .memory import OPTIMIZERS, Plan, Settings, memory_plan
from .methods import METHODS, build_config, method_spec
from .params import Census, census
from .units import GIB, gib, parse_size


@dataclasses.dataclass
class Estimate:
    model: str
    method: str
    census: Census
    plan: Plan
    settings: Settings


def estimate(model: str, method: str, options: dict | None = None,
             settings: Settings = Settings()) -> Estimate:
    """Count `model` adapted by `method` with `options` (PEFT config fields) and plan its memory."""
    spec = method_spec(method)
    config = load_config(model)
    peft_config = build_config(spec, dict(options or {}))
    counted = census(config, spec, peft_config, settings.dtype)
    plan = memory_plan(counted, config, settings, method_full=peft_config is None)
    return Estimate(model, method, counted, plan, settings)


__all__ = ["GIB", "KNOWN", "METHODS", "OPTIMIZERS", "Estimate", "Plan", "Settings", "estimate",
           "gib", "load_config", "parse_size"]
