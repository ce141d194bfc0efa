"""Bottleneck adapters: Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP"
(arXiv:1902.00751), and the single-adapter placement of Pfeiffer et al., 2020, "AdapterFusion"
(arXiv:2005.00247) as packaged by AdapterHub (Pfeiffer et al., 2020, arXiv:2007.07779).

A small residual MLP is inserted on the output of a transformer sub-layer, before that sub-layer's
residual connection:

    h (..., d)  ------------------------------------------.
      |                                                   |
      dropout -> down: d -> m -> act -> up: m -> d         |
      |                                                   |
      '-------------------------(+)------------------------'
                                 v
                   h + up(act(down(dropout(h))))   (..., d)

with m = bottleneck_size, or d // reduction_factor when bottleneck_size is None. `down` keeps
nn.Linear's default (Kaiming-uniform) init; `up` (weight and bias) starts at zero, so the model is
exactly unchanged at injection (Houlsby's near-identity init, made exact).

Placement (`variant`): "houlsby" puts one adapter after the attention output and one after the
MLP output of every block; "pfeiffer" one after the MLP output only. The sub-layer outputs are found
through `ARCHITECTURES`, a table of attribute paths per `config.model_type`, and the adapter runs
as a forward hook on that module, so the model's own code and weights are untouched.

Trainable parameters (the closed form the tests check), with L the number of adapted blocks and
s = 2 (houlsby) or 1 (pfeiffer) sites per block:

    L * s * (2 * d * m + m + d)

e.g. BERT-base (d = 768, L = 12), houlsby, reduction_factor 16 (m = 48): 1,789,056.

Bottleneck adapters cannot be merged into the base weights (the non-linearity sits between down
and up): each adapter costs two small matmuls per site at inference, which is their latency cost.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..config import PeftConfig, PeftType, check
from ..train.ranges import positive_float
from .base import Injector, TunerLayer
from .modules_to_save import add_modules_to_save
from .spec import MethodSpec, PlannerSupport

VARIANTS = {"houlsby": ("attention", "mlp"), "pfeiffer": ("mlp",)}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Where the sub-layer outputs of one architecture are.

    `blocks`: path (or path suffix) of the nn.ModuleList of transformer blocks;
    `attention` / `mlp`: path inside a block of the module whose output (a tensor, or a tuple whose
    first item is the hidden states) is that sub-layer's output before its residual connection.
    """

    blocks: str
    attention: str
    mlp: str


_DECODER = BlockLayout(blocks="layers", attention="self_attn", mlp="mlp")
_BERT = BlockLayout(blocks="encoder.layer", attention="attention.output.dropout",
                    mlp="output.dropout")

# model_type -> layout. BERT's sub-layer outputs are taken after the output projection and its
# dropout, before the residual LayerNorm (where AdapterHub places them).
ARCHITECTURES: dict[str, BlockLayout] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "gpt2": BlockLayout(blocks="h", attention="attn", mlp="mlp"),
    "bert": _BERT,
    "roberta": _BERT,
}


@dataclasses.dataclass
class AdapterConfig(PeftConfig):
    """Bottleneck adapter hyper-parameters (peftkit's own `peft_type`: "BOTTLENECK").

    variant: "houlsby" (after attention and MLP) or "pfeiffer" (after the MLP only).
    reduction_factor: m = hidden_size // reduction_factor (AdapterHub's default, 16).
    bottleneck_size: m directly; when set it overrides reduction_factor.
    non_linearity: "relu", "gelu" or "silu".
    dropout: dropout probability on the adapter branch's input.
    layers_to_transform: block index or list of indices to adapt (default: every block).
    modules_to_save: modules trained in full and saved with the adapter (PEFT's meaning); for
        task_type SEQ_CLS the classification head is added, as for LoRA.
    """

    PEFT_TYPE = PeftType.BOTTLENECK

    variant: str = "houlsby"
    reduction_factor: float = 16
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    dropout: float = 0.0
    layers_to_transform: list[int] | int | None = None
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        check(self.variant in VARIANTS, "variant",
              f"unknown preset {self.variant!r}; use one of {sorted(VARIANTS)}")
        check(_is_number(self.reduction_factor) and self.reduction_factor >= 1,
              "reduction_factor", f"must be a number >= 1, got {self.reduction_factor!r}")
        size = self.bottleneck_size
        check(size is None or _is_index(size) and size > 0, "bottleneck_size",
              f"must be a positive integer or None, got {size!r}")
        check(self.non_linearity in ACTIVATIONS, "non_linearity",
              f"must be one of {sorted(ACTIVATIONS)}, got {self.non_linearity!r}")
        check(_is_number(self.dropout) and 0 <= self.dropout < 1, "dropout",
              f"must be in [0, 1), got {self.dropout!r}")
        save = self.modules_to_save
        check(save is None or isinstance(save, list) and all(isinstance(m, str) for m in save),
              "modules_to_save", f"expected a list of module names, got {save!r}")
        layers = self.layers_to_transform
        if isinstance(layers, tuple):
            layers = self.layers_to_transform = list(layers)
        check(layers is None or _is_index(layers)
              or (isinstance(layers, list) and layers and all(_is_index(i) for i in layers)),
              "layers_to_transform", f"expected a block index or a list of them, got {layers!r}")

    def bottleneck_for(self, hidden_size: int) -> int:
        """m for a model of width `hidden_size`; an empty bottleneck raises naming the field."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        m = int(hidden_size // self.reduction_factor)
        check(m >= 1, "reduction_factor",
              f"{self.reduction_factor} is larger than the hidden size {hidden_size}; the "
              f"bottleneck would be empty")
        return m

    def layer_indices(self, num_blocks: int) -> list[int]:
        layers = self.layers_to_transform
        if layers is None:
            return list(range(num_blocks))
        layers = [layers] if isinstance(layers, int) else sorted(set(layers))
        check(layers[-1] < num_blocks, "layers_to_transform",
              f"block {layers[-1]} does not exist; the model has {num_blocks} blocks")
        return layers


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class Bottleneck(nn.Module):
    """One adapter's branch: (..., d) -> (..., d), `up(act(down(dropout(h))))`; zero at init."""

    def __init__(self, hidden_size: int, bottleneck_size: int, non_linearity: str,
                 dropout: float, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.down = nn.Linear(hidden_size, bottleneck_size, device=device, dtype=dtype)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(bottleneck_size, hidden_size, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(self.dropout(h))))


class BottleneckLayer(TunerLayer):
    """The named adapters of one site, applied by a forward hook on the site's module.

    The layer sits next to the block's own modules (`<block>.<site>_adapter`); on disk adapter
    tensors are `base_model.model.<block>.<site>_adapter.{down,up}.{weight,bias}`.
    """

    def __init__(self, hooked: nn.Module) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self._handle = hooked.register_forward_hook(self._hook)

    def add(self, name: str, branch: Bottleneck) -> None:
        self.adapters[name] = branch

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        return dict(self.adapters[name].named_parameters())

    def delete_adapter(self, name: str) -> None:
        del self.adapters[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        held = [n for n in names if n in self.adapters]
        if held:
            raise NotImplementedError(
                f"bottleneck adapters {held} cannot be merged into the base weights: a "
                "non-linearity sits between their down- and up-projection, so they stay as extra "
                "modules at inference (their latency cost). Keep the PeftModel, or use unload() "
                "to get the base model back without them."
            )

    def unwrap(self, merge: bool) -> None:
        self._handle.remove()
        return None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (..., d) -> h + the active adapters' branches, in h's dtype."""
        out = h
        for name in self.active_adapters:
            branch = self.adapters[name]
            out = out + branch(h.to(branch.up.weight.dtype)).to(h.dtype)
        return out

    def _hook(self, module: nn.Module, args: tuple, output):
        if self.disabled or not self.active_adapters:
            return None
        if isinstance(output, tuple):
            return (self(output[0]),) + output[1:]
        return self(output)


def find_blocks(model: nn.Module) -> tuple[BlockLayout, str, nn.ModuleList]:
    """(layout, path, ModuleList) of `model`'s transformer blocks, from `ARCHITECTURES`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"bottleneck adapters have no entry for model_type {model_type!r} (known: "
            f"{sorted(ARCHITECTURES)}). Add one: peftkit.methods.bottleneck.ARCHITECTURES"
            f"[{model_type!r}] = BlockLayout(blocks='<path of the ModuleList of blocks>', "
            f"attention='<module in a block whose output is the attention output>', "
            f"mlp='<module in a block whose output is the MLP output>')"
        )
    layout = ARCHITECTURES[model_type]
    found = [(p, m) for p, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and (p == layout.blocks
                                                  or p.endswith("." + layout.blocks))]
    if len(found) != 1:
        raise ValueError(
            f"ARCHITECTURES[{model_type!r}].blocks={layout.blocks!r} should name one nn.ModuleList "
            f"of {type(model).__name__}, found {[p for p, _ in found]}"
        )
    return layout, *found[0]


class BottleneckInjector(Injector):
    def inject(self, model: nn.Module, config: AdapterConfig, name: str,
               autocast_adapter_dtype: bool = True) -> None:
        layout, _, blocks = find_blocks(model)
        hidden = model.config.hidden_size
        m = config.bottleneck_for(hidden)
        for index in config.layer_indices(len(blocks)):
            block = blocks[index]
            # the first floating weight: a k-bit block's first may be packed codes (uint8)
            weight = next((p for p in block.parameters() if p.is_floating_point()),
                          next(block.parameters()))
            dtype = torch.float32 if autocast_adapter_dtype or not weight.is_floating_point() \
                else weight.dtype
            for site in VARIANTS[config.variant]:
                attr = f"{site}_adapter"
                layer = getattr(block, attr, None)
                if layer is None:
                    layer = BottleneckLayer(block.get_submodule(getattr(layout, site)))
                    block.add_module(attr, layer)
                layer.add(name, Bottleneck(hidden, m, config.non_linearity, config.dropout,
                                           weight.device, dtype))
        add_modules_to_save(model, config.modules_to_save, name)


SPEC = MethodSpec(
    name="adapter", help="bottleneck adapters after sub-layers (Houlsby et al., 2019)",
    config_cls=AdapterConfig, injector=BottleneckInjector(),
    flags={
        "variant": dict(default="houlsby", choices=list(VARIANTS),
                        help="houlsby: after attention and MLP; pfeiffer: after the MLP only"),
        "reduction_factor": dict(type=positive_float, default=16.0,
                                 help="bottleneck size = hidden size / reduction factor"),
        "non_linearity": dict(default="relu", choices=list(ACTIVATIONS),
                              help="activation inside the bottleneck"),
    },
    planner=PlannerSupport(uncounted="the bottleneck layers' own activations (their input, "
                           "hidden units and output) are not counted"),
    merges=False, shardable=True, learning_rate=1e-3,
    compare_flags={"variant": "houlsby", "reduction_factor": 16},
)
