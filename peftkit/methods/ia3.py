"""(IA)^3: Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning" (arXiv:2205.05638).

Learned vectors rescale the activations of chosen linear layers W: (out, in):

    attention-side targets (keys, values):  y = l * base(x),    l: (out, 1)  one scale per output
    feed-forward targets:                    y = base(l * x),    l: (1, in)   one scale per input

l starts at 1, so the model is unchanged at injection. Merging is exact: W <- W * l (rows for
output scales, columns for input scales; an output scale also scales the bias); unmerging
divides it out again. GPT-2's `Conv1D` stores W as (in, out), so l is transposed there.

Over a bitsandbytes k-bit base (`Linear4bit`, `Linear8bitLt`) the scaling stays outside the
quantized weight, so training and the unmerged forward are as above. Merging into it dequantizes
W, scales it in fp32 and re-quantizes with the layer's own settings, with a warning (each weight
moves by up to half a codebook step); `merge_and_unload(dequantize=True)` merges exactly into
full-precision weights instead. PEFT's k-bit (IA)^3 layers cannot merge at all.
Files are PEFT's: `base_model.model.<module path>.ia3_l` and PEFT's IA3Config keys.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import quant, targets
from ..config import PeftConfig, PeftType, check
from ..train.ranges import csv_list
from .base import Injector, WrappedLayer, replace_module
from .modules_to_save import add_modules_to_save
from .spec import TARGET_MODULES, MethodSpec, PlannerSupport

# PEFT's defaults for models whose config names no target_modules / feedforward_modules.
DEFAULT_TARGETS = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
}


@dataclasses.dataclass
class IA3Config(PeftConfig):
    """(IA)^3 with Hugging Face PEFT's names, defaults and JSON layout."""

    PEFT_TYPE = PeftType.IA3
    # PEFT's IA3 has no layer selection; `targets.find_targets` reads these.
    layers_to_transform: ClassVar[None] = None
    layers_pattern: ClassVar[None] = None

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def validate(self) -> None:
        for name in ("target_modules", "exclude_modules", "feedforward_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                value = sorted(value)
                setattr(self, name, value)
            ok = value is None or isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(v, str) for v in value))
            check(ok, name, f"expected a list of module names or a regex string, got {value!r}")
        check(not isinstance(self.modules_to_save, str), "modules_to_save", "expected a list")
        ff, tm = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(tm, list):
            check(set(ff) <= set(tm), "feedforward_modules",
                  f"must be a subset of target_modules; {sorted(set(ff) - set(tm))} are not")
        for name in ("fan_in_fan_out", "init_ia3_weights"):
            check(isinstance(getattr(self, name), bool), name, "must be True or False")

    def is_feedforward(self, path: str) -> bool:
        """PEFT's rule: a regex must match the full path; a list entry must end the path."""
        ff = self.feedforward_modules or []
        if isinstance(ff, str):
            return re.fullmatch(ff, path) is not None
        return any(path.endswith(entry) for entry in ff)


class IA3Linear(WrappedLayer):
    """Wraps a linear layer (`nn.Linear`, `Conv1D`, or a bitsandbytes k-bit linear) with named
    (IA)^3 scaling vectors.

    In memory: `<path>.base_layer.weight`, `<path>.ia3_l.<name>`; x: (..., in) -> (..., out).
    """

    def __init__(self, base_layer: nn.Module, is_feedforward: bool) -> None:
        super().__init__(base_layer)
        self.is_feedforward = is_feedforward
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        # a k-bit weight is stored packed: its shape is not (out, in)
        self.in_features, self.out_features = (
            base_layer.weight.shape if self.fan_in_fan_out
            else (base_layer.in_features, base_layer.out_features))
        self.ia3_l = nn.ParameterDict()

    def add(self, name: str, init: bool, dtype: torch.dtype) -> None:
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        device = self.base_layer.weight.device
        value = torch.ones(shape, dtype=dtype, device=device) if init else \
            torch.randn(shape, dtype=dtype, device=device)
        self.ia3_l[name] = nn.Parameter(value)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.ia3_l)

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        return {"ia3_l": self.ia3_l[name]}

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge it before deleting it")
        del self.ia3_l[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def _scale_weights(self, name: str, divide: bool, safe: bool = False) -> None:
        l = self.ia3_l[name].detach().float()  # noqa: E741 (the paper's name)
        l = 1 / l if divide else l
        base = self.base_layer
        kbit = quant.kbit_kind(base)
        stored = quant.dequantize_weight(base) if kbit else base.weight.data
        weight = stored.float() * (l.T if self.fan_in_fan_out else l)
        bias = None
        if not self.is_feedforward and base.bias is not None:
            bias = base.bias.data.float() * l.flatten()
        finite = torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())
        if safe and not finite:
            raise ValueError(f"merging adapter {name!r} gives non-finite weights; not merged")
        if kbit:
            verb = "unmerging" if divide else "merging"
            warnings.warn(f"{verb} (IA)^3 adapter {name!r} into a {kbit} weight "
                          "re-quantizes it: each weight moves by up to half a codebook step. Use "
                          "merge_and_unload(dequantize=True) for an exact full-precision merge.",
                          stacklevel=4)
            quant.requantize_(base, weight)
        else:
            base.weight.data.copy_(weight.to(base.weight.dtype))
        if bias is not None:
            base.bias.data.copy_(bias.to(base.bias.dtype))

    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        for name in names:
            if name in self.ia3_l and name not in self.merged_adapters:
                self._scale_weights(name, divide=False, safe=safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._scale_weights(self.merged_adapters.pop(), divide=True)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = [] if self.disabled else [n for n in self.active_adapters
                                          if n not in self.merged_adapters]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        scale = self.ia3_l[names[0]].flatten()
        for name in names[1:]:
            scale = scale * self.ia3_l[name].flatten()
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype), *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)
        return (y * scale).to(y.dtype)


def _adapter_dtype(base: nn.Module, autocast: bool) -> torch.dtype:
    """fp32 (`autocast`), else the base layer's: its compute dtype over a k-bit layer."""
    kind = quant.kbit_kind(base)
    dtype = ((base.compute_dtype or quant.source_dtype(base)) if kind == "4bit"
             else torch.float16 if kind == "8bit" else base.weight.dtype)
    return torch.float32 if autocast or not dtype.is_floating_point else dtype


class IA3Injector(Injector):
    def inject(self, model: nn.Module, config: IA3Config, name: str,
               autocast_adapter_dtype: bool = True) -> None:
        if config.target_modules is None:
            config.target_modules, config.feedforward_modules = (list(v) for v in (
                targets.model_default(model, DEFAULT_TARGETS, "(IA)^3 ",
                                      "pass target_modules=[...] and feedforward_modules=[...]")))
        paths = targets.find_targets(model, config)
        for path in paths:
            layer = model.get_submodule(path)
            if not isinstance(layer, IA3Linear):
                check(isinstance(layer, (nn.Linear, Conv1D)), "target_modules",
                      f"{path} is a {type(layer).__name__}; (IA)^3 wraps nn.Linear and Conv1D")
                layer = IA3Linear(layer, config.is_feedforward(path))
                replace_module(model, path, layer)
            layer.add(name, config.init_ia3_weights,
                      _adapter_dtype(layer.base_layer, autocast_adapter_dtype))
        config.fan_in_fan_out = any(model.get_submodule(p).fan_in_fan_out for p in paths)
        add_modules_to_save(model, config.modules_to_save, name)


SPEC = MethodSpec(
    name="ia3", help="learned scaling vectors on activations (Liu et al., 2022)",
    config_cls=IA3Config, injector=IA3Injector(),
    flags={
        "target_modules": TARGET_MODULES,
        "feedforward_modules": dict(type=csv_list, default=None,
                                    help="the target_modules whose input is scaled, not "
                                         "their output (default: the model type's PEFT default)"),
    },
    planner=PlannerSupport(uncounted="the outputs (inputs, for feedforward_modules) that the "
                           "scaling vectors save for backward are not counted"),
    learning_rate=3e-3,
)
