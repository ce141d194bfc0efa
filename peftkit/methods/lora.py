"""LoRA: Low-Rank Adaptation (Hu et al., 2021, arXiv:2106.09685); rsLoRA scaling from
Kalajdzievski, 2023 (arXiv:2312.03732).

A frozen linear map W0 (out_features x in_features) gets a trainable low-rank update:

    W = W0 + scaling * B @ A,   A: (r, in_features),  B: (out_features, r),
    scaling = lora_alpha / r          (rsLoRA: lora_alpha / sqrt(r))

           x (..., in)
           |---------------------------.
           v                           v
      base_layer(x)             dropout -> A -> B -> * scaling
           |                           |
           '------------(+)------------'
                         v
                    y (..., out)

Default init (`init_lora_weights=True`): A kaiming-uniform with a = sqrt(5) and B = 0, so the model
is unchanged at injection; `"gaussian"`: A ~ N(0, 1/r); `False`: nn.Linear's default init for both;
`"pissa"`, `"pissa_niter_N"`, `"olora"`: A and B from the base weight, which becomes the residual
(`pissa`).
GPT-2's `Conv1D` stores its weight as (in, out): there `fan_in_fan_out` is forced true and only the
delta is transposed when merging; A and B keep the shapes above.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import warnings
from typing import Any, Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import mixed, targets
from ..config import PeftConfig, PeftType, check
from ..fast import lora_fn
from ..train.ranges import csv_list, fraction, positive_float, positive_int
from .base import Injector, WrappedLayer, replace_module
from . import pissa
from .dora import DoraVariant
from .modules_to_save import ModulesToSaveWrapper, add_modules_to_save
from .spec import TARGET_MODULES, Finding, MethodSpec, PlannerSupport

BIAS_MODES = ("none", "all", "lora_only")

# PEFT's defaults for models whose config names no target_modules.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "t5": ["q", "v"],
}


@dataclasses.dataclass
class LoraConfig(PeftConfig):
    """LoRA hyper-parameters, with Hugging Face PEFT's names, defaults and JSON layout."""

    PEFT_TYPE = PeftType.LORA
    # peft 0.21.2's LoRA fields peftkit does not implement (the other LoRA variants, data-driven
    # inits, Megatron, ...), with peft's defaults as JSON; init_lora_weights is checked in validate.
    UNSUPPORTED_DEFAULTS = {
        "alora_invocation_tokens": None,
        "arrow_config": None,
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "kasa_config": None,
        "layer_replication": None,
        "loftq_config": {},
        "lora_bias": False,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "monteclora_config": None,
        "qalora_group_size": 16,
        "runtime_config": {"ephemeral_gpu_offload": False},
        "target_parameters": None,
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_qalora": False,
        "velora_config": None,
    }

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    init_lora_weights: bool | str = True
    use_rslora: bool = False
    use_dora: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                value = list(value)
                setattr(self, name, value)
            ok = value is None or isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(v, str) for v in value)
            )
            check(ok, name, f"expected a list of module names or a regex string, got {value!r}")
        check(not isinstance(self.modules_to_save, str), "modules_to_save", "expected a list")
        check(_is_pos_int(self.r), "r", f"the rank must be a positive integer, got {self.r!r}")
        check(_is_pos_num(self.lora_alpha), "lora_alpha", f"must be > 0, got {self.lora_alpha!r}")
        check(
            isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1,
            "lora_dropout",
            f"must be in [0, 1), got {self.lora_dropout!r}",
        )
        check(self.bias in BIAS_MODES, "bias", f"must be one of {BIAS_MODES}, got {self.bias!r}")
        check(
            (self.init_lora_weights in (True, False, "gaussian")
             and isinstance(self.init_lora_weights, (bool, str)))
            or pissa.valid(self.init_lora_weights),
            "init_lora_weights",
            f"peftkit implements True, False, 'gaussian', 'pissa', 'pissa_niter_N' and 'olora', "
            f"got {self.init_lora_weights!r} (PEFT's other inits, e.g. 'loftq', 'corda', 'mica', "
            "change the base weights or the layer: load such an adapter with Hugging Face PEFT, "
            "or merge it with PEFT first; for LoftQ see peftkit.methods.loftq)",
        )
        for name in ("fan_in_fan_out", "use_rslora", "use_dora"):
            check(isinstance(getattr(self, name), bool), name, "must be True or False")
        layers = self.layers_to_transform
        check(
            layers is None
            or _is_index(layers)
            or (isinstance(layers, list) and all(_is_index(i) for i in layers)),
            "layers_to_transform",
            f"expected a layer index or a list of them, got {layers!r}",
        )
        for name, valid in (("rank_pattern", _is_pos_int), ("alpha_pattern", _is_pos_num)):
            pattern = getattr(self, name)
            check(isinstance(pattern, dict), name, "expected a dict {module regex: value}")
            bad = {k: v for k, v in pattern.items() if not valid(v)}
            check(not bad, name, f"values must be positive, got {bad}")

    def scaling_for(self, path: str) -> tuple[int, float, float]:
        """(r, alpha, scaling) of the module at `path`, after rank_pattern / alpha_pattern."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, path), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, path), self.lora_alpha)
        return r, alpha, alpha / (math.sqrt(r) if self.use_rslora else r)


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_pos_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _pattern_key(patterns: dict[str, Any], path: str) -> str:
    """PEFT's rule: the first pattern p with `(.*\\.)?(p)$` matching the module path."""
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", path)), path)


# PEFT's variant table: a config field that, when set, gives an adapter its own arithmetic (an
# object with init, forward, merge and unmerge, as `dora.DoraVariant`); none set: plain LoRA.
VARIANTS = {"use_dora": DoraVariant}


def variant_for(config: LoraConfig) -> Any:
    """The variant of the first field of `VARIANTS` that `config` sets, else None."""
    return next((v for field, v in VARIANTS.items() if getattr(config, field)), None)


class LoraLinear(WrappedLayer):
    """Wraps a linear layer (`nn.Linear`, `Conv1D`, or a k-bit linear) with named LoRA adapters.

    In memory the keys are PEFT's: `<path>.base_layer.weight`, `<path>.lora_A.<name>.weight`.
    Input x: (..., in_features); output: (..., out_features) in the base layer's dtype.
    `forward` calls the submodules (base_layer, lora_dropout, lora_A, lora_B), so their hooks,
    FSDP2 and ZeRO-3 see every call. With `use_lora_function` (the speed layer's switch,
    `peftkit.fast`) a branch whose submodules have no hooks runs through
    `fast.lora_fn.LoraFunction` instead: the same values, and it saves x rather than a dropped
    copy of it. An adapter with a variant (`VARIANTS`, e.g. DoRA) runs the variant's `forward`
    on these submodules instead. In a mixed-adapter batch (`peftkit.mixed`) each distinct
    adapter runs on its own rows only (`_mixed_forward`).
    """

    mixes_rows = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA's m per adapter (`dora.Magnitude`)
        self.variants: dict[str, Any] = {}  # adapter name -> its variant; plain LoRA: absent
        self.merged_norms: dict[str, torch.Tensor] = {}  # DoRA: the norm each merge divided by
        self.use_lora_function = True

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def compute_dtype(self) -> torch.dtype:
        """The float dtype the base layer computes in (adapters use it without autocast)."""
        return self.base_layer.weight.dtype

    def add(self, name: str, r: int, alpha: float, scaling: float, dropout: float,
            init: bool | str, dtype: torch.dtype, variant: Any = None) -> None:
        device = self.base_layer.weight.device
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, alpha, scaling
        if pissa.valid(init):
            pissa.init_from_base(self, name, init)
        elif init is not False:
            if init is True:
                nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A[name].weight, std=1 / r)
            nn.init.zeros_(self.lora_B[name].weight)
        if variant is not None:
            self.variants[name] = variant
            variant.init(self, name)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        tensors = {"lora_A.weight": self.lora_A[name].weight,
                   "lora_B.weight": self.lora_B[name].weight}
        if name in self.lora_magnitude_vector:
            tensors["lora_magnitude_vector"] = self.lora_magnitude_vector[name].weight
        return tensors

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge it before deleting it")
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        for d in (self.r, self.lora_alpha, self.scaling):
            del d[name]
        if name in self.variants:
            del self.variants[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight between the base layer's layout and (out, in) (a transpose for Conv1D)."""
        return weight.T if self.fan_in_fan_out else weight

    def dense_weight(self) -> torch.Tensor:
        """The base weight as (out, in), in the dtype the base layer computes with."""
        return self.out_in(self.base_layer.weight)

    def lora_delta(self, name: str) -> torch.Tensor:
        """scaling * B @ A as (out, in), fp32."""
        return (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B @ A in the base weight's layout ((in, out) for Conv1D), fp32."""
        return self.out_in(self.lora_delta(name))

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """fp32 `weight` (base layout) with adapter `name` folded in; its variant's rule, or
        W + delta. A variant's rule gets the weight with no adapter merged as well."""
        variant = self.variants.get(name)
        if variant is None:
            return weight + self.delta_weight(name)
        unmerged = weight
        for done in reversed(self.merged_adapters):
            unmerged = self.unmerged_weight(done, unmerged)
        return variant.merge(self, name, weight, unmerged)

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """fp32 `weight` with adapter `name`, the last one merged into it, taken out."""
        variant = self.variants.get(name)
        return weight - self.delta_weight(name) if variant is None else \
            variant.unmerge(self, name, weight)

    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        weight = self.base_layer.weight
        for name in names:
            if name not in self.lora_A or name in self.merged_adapters:
                continue
            merged = self.merged_weight(name, weight.data.float())
            if safe_merge and not torch.isfinite(merged).all():
                self.merged_norms.pop(name, None)
                raise ValueError(f"merging adapter {name!r} gives non-finite weights; not merged")
            weight.data.copy_(merged.to(weight.dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.data.copy_(self.unmerged_weight(name, weight.data.float()).to(weight.dtype))
            self.merged_norms.pop(name, None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return y
        rows = mixed.current()
        if rows is not None:
            return self._mixed_forward(x, y, rows)
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                y = self._add_branch(name, x, y)
        return y

    def fused(self, name: str) -> bool:
        """Whether adapter `name`'s branch runs through the speed layer's autograd function
        (`fast.lora_fn.LoraFunction`, or its variant's, e.g. `fast.dora_fn.DoraFunction`)."""
        variant = self.variants.get(name)
        if variant is not None:
            return variant.fused(self, name)
        return self.use_lora_function and lora_fn.fusable(
            self.lora_A[name], self.lora_B[name], self.lora_dropout[name])

    def _add_branch(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + adapter `name`'s branch on x, in y's dtype: its variant's rule, else the LoRA
        function where `fusable`, else the submodules with PEFT's arithmetic (the branch in the
        adapter dtype, the sum cast back)."""
        variant = self.variants.get(name)
        if variant is not None:
            return variant.forward(self, name, x, y).to(y.dtype)
        a, b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        if self.fused(name):
            p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
            return lora_fn.lora_forward(y, x, a.weight, b.weight, self.scaling[name], p)
        return (y + b(a(dropout(x.to(a.weight.dtype)))) * self.scaling[name]).to(y.dtype)

    def _mixed_forward(self, x: torch.Tensor, y: torch.Tensor, rows: mixed.MixedRows):
        """y (B, ..., out) with each row's adapter added: for each distinct adapter, its rows of
        x and y are gathered, run through `_add_branch` as in `forward`, and written back."""
        rows.check_batch(x.shape[0])
        if self.merged_adapters:
            raise ValueError(f"adapter_names cannot be used while adapters are merged into the "
                             f"weights ({self.merged_adapters}): call unmerge_adapter() first")
        for name, idx in rows.groups(x.device):
            if name in self.lora_A:  # not "__base__", nor an adapter that skips this layer
                out = self._add_branch(name, x.index_select(0, idx), y.index_select(0, idx))
                y.index_copy_(0, idx, out)
        return y


class LoraInjector(Injector):
    def inject(self, model: nn.Module, config: LoraConfig, name: str,
               autocast_adapter_dtype: bool = True) -> None:
        if config.target_modules is None:
            config.target_modules = list(targets.model_default(
                model, DEFAULT_TARGETS, "", "pass target_modules=[...] or 'all-linear'"))
        paths = targets.find_targets(model, config)
        modules = dict(targets.named_modules(model))
        is_conv1d = [isinstance(modules[p], Conv1D) for p in paths]
        if any(is_conv1d) != config.fan_in_fan_out:
            warnings.warn(
                f"fan_in_fan_out={config.fan_in_fan_out} does not fit the targeted "
                f"{'Conv1D' if any(is_conv1d) else 'nn.Linear'} layers; setting it to "
                f"{any(is_conv1d)}",
                stacklevel=3,
            )
            config.fan_in_fan_out = any(is_conv1d)
        for path in paths:
            layer = model.get_submodule(path)
            if not isinstance(layer, LoraLinear):
                layer = wrapper_for(layer)(layer)
                replace_module(model, path, layer)
            r, alpha, scaling = config.scaling_for(path)
            dtype = torch.float32 if autocast_adapter_dtype else layer.compute_dtype
            layer.add(name, r, alpha, scaling, config.lora_dropout, config.init_lora_weights, dtype,
                      variant_for(config))
        add_modules_to_save(model, config.modules_to_save, name)

    def extra_tensors(self, model: nn.Module, config: LoraConfig) -> dict[str, nn.Parameter]:
        if config.bias == "lora_only":
            return {
                f"{path}.base_layer.bias": m.base_layer.bias
                for path, m in model.named_modules()
                if isinstance(m, LoraLinear) and m.base_layer.bias is not None
            }
        if config.bias == "all":
            wrapped = [p + "." for p, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
            return {
                n: p
                for n, p in model.named_parameters()
                if n.rsplit(".", 1)[-1] == "bias" and not any(n.startswith(w) for w in wrapped)
            }
        return {}


# (predicate on a base layer, LoraLinear subclass that wraps it); other modules (qlora) add theirs.
WRAPPERS: list[tuple[Callable[[nn.Module], bool], type[LoraLinear]]] = []


def register_wrapper(accepts: Callable[[nn.Module], bool], cls: type[LoraLinear]) -> None:
    """Make `inject` wrap base layers for which `accepts(layer)` holds with `cls`."""
    WRAPPERS.append((accepts, cls))


def wrapper_for(base_layer: nn.Module) -> type[LoraLinear]:
    return next((cls for accepts, cls in WRAPPERS if accepts(base_layer)), LoraLinear)



@dataclasses.dataclass
class LoraSite:
    """A LoRA-wrapped linear layer: what its branch saves for backward (`planner.activations`)."""

    path: str
    in_features: int
    r: int
    dropout: float
    dtype: torch.dtype
    out_features: int = 0
    dora: bool = False  # DoRA: its magnitude scaling saves more (`planner.activations`)
    fused: bool = True  # the branch runs through the speed layer's autograd function


def planner_sites(model: nn.Module) -> list[LoraSite]:
    """The active LoRA branches of `model`, for the memory plan."""
    return [LoraSite(path, m.in_features, m.r[name], getattr(m.lora_dropout[name], "p", 0.0),
                     m.lora_A[name].weight.dtype, m.out_features,
                     name in m.lora_magnitude_vector, m.fused(name))
            for path, m in model.named_modules() if isinstance(m, LoraLinear)
            for name in m.active_adapters]


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "query", "key", "value",
             "query_key_value", "qkv_proj", "Wqkv")


def doctor_checks(cfg: dict) -> list[Finding]:
    """The rules of thumb of the LoRA literature and common practice (Hu et al., 2021; Dettmers
    et al., 2023; PEFT's docs): r between 8 and 32 (64 at most), alpha = 2r, lr 1e-4 to 2e-4,
    q_proj and v_proj first (attention projections), embed_tokens and lm_head usually not.
    Variants: rsLoRA for high ranks (Kalajdzievski, 2023); LoRA+ ratio 16 (Hayou et al., 2024).
    DoRA (Liu et al., 2024) reuses LoRA's settings and states no rule of its own."""
    out: list[Finding] = []
    r = cfg.get("r", 8)
    if isinstance(r, int) and r < 8:
        out.append(Finding("warning", "rank-low", f"r={r} is below 8: the update may be too "
                           "low-rank to learn the task.", "use r between 8 and 32."))
    rslora = bool(cfg.get("use_rslora"))
    if isinstance(r, int) and r > 64 and not rslora:
        out.append(Finding("warning", "rank-high", f"r={r} is above 64: more memory and "
                           "overfitting risk for little gain.", "use r between 8 and 32."))
    if isinstance(r, int) and r > 32 and not rslora:
        out.append(Finding("info", "rslora", f"r={r} with scaling alpha/r: Kalajdzievski (2023) "
                           "shows this scaling slows learning as r grows, so high ranks gain "
                           "little; alpha/sqrt(r) (rsLoRA) lets them learn more.",
                           "add use_rslora, or keep r at 32 or below."))
    ratio = cfg.get("loraplus_lr_ratio")
    if ratio is not None and float(ratio) <= 1:
        out.append(Finding("warning", "loraplus-ratio", f"loraplus_lr_ratio={ratio}: LoRA+ "
                           "(Hayou et al., 2024) gives B a larger learning rate than A; a ratio "
                           "of 1 or less does not.", "use 16, the paper's recommended ratio."))
    elif ratio is not None and float(ratio) != 16:
        out.append(Finding("info", "loraplus-ratio", f"loraplus_lr_ratio={ratio}: Hayou et al. "
                           "(2024) recommend 2^4 = 16 as a default.", "use 16 unless you tuned "
                           "it."))
    alpha = cfg.get("lora_alpha")
    if isinstance(r, int) and alpha is not None and alpha != 2 * r:
        out.append(Finding("info", "alpha", f"lora_alpha={alpha} is not 2r={2 * r}; the update "
                           f"is scaled by alpha/r={alpha / r:g}.",
                           f"set lora_alpha={2 * r} unless you tuned it."))
    lr = cfg.get("learning_rate")
    if lr is not None and float(lr) < 1e-4:
        out.append(Finding("warning", "lr-low", f"learning_rate={lr} is below 1e-4: LoRA learns "
                           "slowly at full fine-tuning rates.", "use 1e-4 to 2e-4."))
    if lr is not None and float(lr) > 1e-3:
        out.append(Finding("warning", "lr-high", f"learning_rate={lr} is above 1e-3: training "
                           "may diverge.", "use 1e-4 to 2e-4."))
    tm = cfg.get("target_modules")
    tm = csv_list(tm) if isinstance(tm, str) else tm
    if isinstance(tm, list):
        leaves = {t.rsplit(".", 1)[-1] for t in tm}
        for bad in ("embed_tokens", "lm_head"):
            if bad in leaves:
                out.append(Finding("warning", "targets-embeddings", f"target_modules has {bad}: "
                                   "large, rarely helps, and changes the vocabulary layers.",
                                   f"drop {bad} (use modules_to_save if you added tokens)."))
        if not leaves & set(ATTENTION):
            out.append(Finding("warning", "no-attention", f"target_modules={tm} has no attention "
                               "projection.", "target q_proj and v_proj first (or all-linear)."))
    dropout = cfg.get("lora_dropout")
    if dropout is not None and not 0 <= float(dropout) < 1:
        out.append(Finding("error", "dropout", f"lora_dropout={dropout} is outside [0, 1).",
                           "use 0 to 0.1."))
    elif dropout is not None and float(dropout) > 0.3:
        out.append(Finding("warning", "dropout", f"lora_dropout={dropout} is above 0.3: the "
                           "adapter sees too little signal.", "use 0 to 0.1."))
    return out


def init_weights(text: str) -> bool | str:
    """`--init-lora-weights`: `true`/`default` (kaiming A, zero B), `gaussian`, `pissa`,
    `pissa_niter_N` or `olora` (`pissa`)."""
    if str(text).lower() in ("true", "default"):
        return True
    if text == "gaussian" or pissa.valid(text):
        return text
    raise argparse.ArgumentTypeError(
        f"expected default, gaussian, pissa, pissa_niter_N (N an integer) or olora, got {text!r}")


FLAGS: dict[str, dict[str, Any]] = {
    "r": dict(type=positive_int, default=8, help="LoRA rank"),
    "lora_alpha": dict(type=positive_float, default=16.0, help="LoRA alpha (scaling = alpha / r)"),
    "lora_dropout": dict(type=fraction, default=0.05, help="dropout on the LoRA branch"),
    "target_modules": TARGET_MODULES,
    "use_rslora": dict(action="store_true", default=False, help="rsLoRA scaling alpha/sqrt(r)"),
    "use_dora": dict(action="store_true", default=False,
                     help="DoRA: a trained magnitude per output row (Liu et al., 2024)"),
    "init_lora_weights": dict(
        type=init_weights, default=True,
        help="LoRA init: default (B = 0), gaussian, pissa, pissa_niter_N (Meng et al., 2024) or "
             "olora (Buyukakyuz, 2024); pissa/olora move part of the base weight into the "
             "adapter, and the saved adapter is converted to plain LoRA for the untouched base "
             "(the init is kept in OUTPUT_DIR/initial_adapter)"),
    "loraplus_lr_ratio": dict(type=positive_float, default=None,
                              help="LoRA+: B's learning rate = ratio x the learning rate, e.g. 16 "
                                   "(Hayou et al., 2024); default: off"),
}

SPEC = MethodSpec(
    name="lora", help="low-rank adapters on linear layers (Hu et al., 2021)",
    config_cls=LoraConfig, injector=LoraInjector(), flags=FLAGS, checks=doctor_checks,
    planner=PlannerSupport(lora_sites=planner_sites), learning_rate=1e-3, shardable=True,
    compare_flags={"r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
                   "target_modules": "q_proj,k_proj,v_proj,o_proj"},
)
