"""The training methods `peftkit estimate` knows, as one table.

Each entry names the PEFT config class that `get_peft_model` injects (imported lazily, so a method
built on another branch appears here by its table entry alone) and whether the base model's linear
weights are stored in 4-bit NF4. Full fine-tuning has no config: every base parameter trains.
QLoRA (Dettmers et al., 2023, arXiv:2305.14314) trains exactly LoRA's parameters on the same model;
only the frozen weights' storage differs, so it counts with `LoraConfig`.
"""

from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    config: str | None  # "module:Class" of the PEFT config, or None for full fine-tuning
    quantized: bool = False  # frozen linear weights in NF4 (QLoRA)

    def config_class(self):
        module, _, cls = self.config.partition(":")
        try:
            return getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError):
            raise ValueError(
                f"method {self.name!r} needs {self.config.replace(':', '.')}, which this peftkit "
                f"install does not have; choose one of {available()}"
            ) from None


METHODS: dict[str, MethodSpec] = {
    "full": MethodSpec("full", None),
    "lora": MethodSpec("lora", "peftkit.methods.lora:LoraConfig"),
    "qlora": MethodSpec("qlora", "peftkit.methods.lora:LoraConfig", quantized=True),
    "adapter": MethodSpec("adapter", "peftkit:AdapterConfig"),
    "prompt": MethodSpec("prompt", "peftkit:PromptTuningConfig"),
}


def available() -> list[str]:
    """Method names whose config class imports in this install."""
    out = []
    for name, spec in METHODS.items():
        try:
            if spec.config is not None:
                spec.config_class()
            out.append(name)
        except ValueError:
            pass
    return out


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {list(METHODS)}")
    return METHODS[name]


def build_config(spec: MethodSpec, options: dict):
    """The method's PEFT config from `options` (config field -> value); None for `full`.

    An option the config class has no field for raises ValueError naming the class's fields.
    """
    if spec.config is None:
        if options:
            raise ValueError(f"full fine-tuning takes no method options; got {sorted(options)}")
        return None
    cls = spec.config_class()
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(
            f"{unknown} do not apply to method {spec.name!r} ({cls.__name__}); its options are "
            f"{sorted(fields - {'base_model_name_or_path', 'revision', 'inference_mode'})}"
        )
    return cls(**{"task_type": "CAUSAL_LM", **options})
