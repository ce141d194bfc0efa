"""The methods peftkit knows, listed once: each module's `SPEC` (see `spec.MethodSpec`).

Adding a method means writing its module and adding it to `_MODULES` (or calling `register`,
as a test or a plugin does).
Registering a spec also registers its config class for `PeftConfig.from_dict` and its injector
for `get_peft_model`, keyed on the config's `peft_type` (LoRA and QLoRA share both).
"""

from __future__ import annotations

from typing import Any

from ..config import PeftConfig, register_config
from . import bottleneck, full, ia3, lora, prompt, qlora
from .base import Injector
from .spec import MethodSpec

SPECS: dict[str, MethodSpec] = {}
_INJECTORS: dict[str, Injector] = {}  # peft_type -> injector
_FLAG_KEYS = ("type", "action", "choices")  # what methods sharing a flag must agree on


def register(spec: MethodSpec) -> MethodSpec:
    """Add `spec` to `SPECS` (and its config class and injector, see the module docstring)."""
    if spec.name in SPECS:
        raise ValueError(f"method {spec.name!r} is registered already")
    for name, flag in spec.flags.items():
        for other in SPECS.values():
            if name in other.flags and any(other.flags[name].get(k) != flag.get(k)
                                           for k in _FLAG_KEYS):
                raise ValueError(f"--{name.replace('_', '-')} of method {spec.name!r} differs in "
                                 f"type from method {other.name!r}'s; give it another name")
    if spec.config_cls is not None:
        peft_type = spec.config_cls.PEFT_TYPE.value
        if _INJECTORS.get(peft_type, spec.injector) is not spec.injector:
            raise ValueError(f"method {spec.name!r} brings a second injector for {peft_type}")
        register_config(spec.config_cls)
        _INJECTORS[peft_type] = spec.injector
    SPECS[spec.name] = spec
    return spec


def spec(name: str) -> MethodSpec:
    if name not in SPECS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(SPECS)}")
    return SPECS[name]


def injector_for(config: PeftConfig) -> Injector:
    try:
        return _INJECTORS[config.peft_type.value]
    except KeyError:
        raise ValueError(f"no peftkit method is registered for {config.peft_type.value}") from None


def all_flags() -> dict[str, dict[str, Any]]:
    """Every method flag once, as the first method that has it defines it."""
    out: dict[str, dict[str, Any]] = {}
    for s in SPECS.values():
        out.update({k: v for k, v in s.flags.items() if k not in out})
    return out


def users(flag: str) -> list[str]:
    """The methods that take option `flag`."""
    return [name for name, s in SPECS.items() if flag in s.flags]


def resolve(method: str, opts: dict[str, Any]) -> tuple[MethodSpec, dict[str, Any]]:
    """The method's spec and its options with defaults filled in. `opts` holds method options,
    `None` where the user did not set one; one set for another method is an error."""
    found = spec(method)
    for name, value in opts.items():
        if value is not None and name not in found.flags:
            raise ValueError(f"--{name.replace('_', '-')} does not apply to --method {method} "
                             f"(it applies to: {', '.join(users(name))})")
    filled = {k: (opts.get(k) if opts.get(k) is not None else f["default"])
              for k, f in found.flags.items()}
    return found, filled


_MODULES = (full, lora, qlora, bottleneck, prompt, ia3)  # in `--method` order
for _module in _MODULES:
    register(_module.SPEC)
