"""Parameter and memory estimates before training (`peftkit estimate`).

    estimate("llama-2-7b", "lora", {"r": 16, "target_modules": [...]}, Settings(batch_size=2))

returns the exact trainable/total parameter counts (`params`, on the meta device) and the memory
plan (`memory`, `activations`, `nf4`). Known architectures: `architectures.KNOWN`; methods: those
of `peftkit.methods.registry` whose spec has planner support.
"""

from __future__ import annotations

import dataclasses

from ..methods import registry
from .architectures import KNOWN, load_config
from .memory import OPTIMIZERS, Plan, Settings, memory_plan
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
    """Count `model` adapted by `method` with `options` (PEFT config fields, and the method's
    run options such as `quant_type`) and plan its memory."""
    spec = registry.spec(method)
    if spec.planner is None:
        raise ValueError(f"peftkit estimate cannot plan method {method!r}: its spec declares no "
                         "planner support; plan one of "
                         f"{', '.join(n for n, s in registry.SPECS.items() if s.planner)}")
    config = load_config(model)
    peft_config = build_config(spec, dict(options or {}))
    counted = census(config, spec, peft_config, settings.dtype)
    plan = memory_plan(counted, config, settings, method_full=peft_config is None)
    return Estimate(model, method, counted, plan, settings)


def build_config(spec, options: dict):
    """The method's PEFT config from `options`; one that is neither a config field nor a flag of
    the method raises ValueError naming the valid ones. None for full fine-tuning."""
    fields = set() if spec.config_cls is None else {
        f.name for f in dataclasses.fields(spec.config_cls)} - {
        "base_model_name_or_path", "revision", "inference_mode"}
    unknown = sorted(set(options) - fields - set(spec.flags))
    if unknown:
        valid = sorted(fields | set(spec.flags))
        raise ValueError(f"{unknown} do not apply to method {spec.name!r}"
                         + (f"; its options are {valid}" if valid else ": it takes no options"))
    return spec.build_config(options)


__all__ = ["GIB", "KNOWN", "OPTIMIZERS", "Estimate", "Plan", "Settings", "estimate",
           "gib", "load_config", "parse_size"]
