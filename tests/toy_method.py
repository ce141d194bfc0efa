"""A toy method written as a method module is (config, layer, injector, spec), for
`test_method_specs.py`: a learned shift added to the output of chosen linear layers,

    y = base(x) + shift        x: (..., in), shift: (out,), zero at injection.

It is registered by one line, `registry.register(SPEC)`, and reaches every command from there."""

from __future__ import annotations

import dataclasses
import enum
from typing import ClassVar

import torch
from torch import nn

from peftkit import targets
from peftkit.config import PeftConfig
from peftkit.methods.base import Injector, WrappedLayer, replace_module
from peftkit.methods.spec import TARGET_MODULES, Finding, MethodSpec


class ToyType(str, enum.Enum):
    TOY = "TOY"


@dataclasses.dataclass
class ToyConfig(PeftConfig):
    PEFT_TYPE = ToyType.TOY
    exclude_modules: ClassVar[None] = None  # read by `targets.find_targets`
    layers_to_transform: ClassVar[None] = None
    layers_pattern: ClassVar[None] = None

    target_modules: list[str] | str = dataclasses.field(
        default_factory=lambda: ["q_proj", "v_proj"])


class ToyShift(WrappedLayer):
    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.toy_shift = nn.ParameterDict()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.toy_shift)

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        return {"toy_shift": self.toy_shift[name]}

    def delete_adapter(self, name: str) -> None:
        del self.toy_shift[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if not self.disabled:
            for name in self.active_adapters:
                y = y + self.toy_shift[name].to(y.dtype)
        return y


class ToyInjector(Injector):
    def inject(self, model: nn.Module, config: ToyConfig, name: str,
               autocast_adapter_dtype: bool = True) -> None:
        for path in targets.find_targets(model, config):
            layer = model.get_submodule(path)
            if not isinstance(layer, ToyShift):
                layer = ToyShift(layer)
                replace_module(model, path, layer)
            weight = layer.base_layer.weight
            layer.toy_shift[name] = nn.Parameter(torch.zeros(weight.shape[0], device=weight.device))


def doctor_checks(cfg: dict) -> list[Finding]:
    if cfg.get("target_modules") is None:
        return [Finding("info", "toy-targets", "target_modules is not set: the toy shifts q_proj "
                        "and v_proj.", "set target_modules.")]
    return []


SPEC = MethodSpec(name="toy", help="a learned output shift (a test method)", config_cls=ToyConfig,
                  injector=ToyInjector(), flags={"target_modules": TARGET_MODULES},
                  checks=doctor_checks, merges=False, learning_rate=1e-2)
