"""What each method module exports: one `MethodSpec`, which every command reads.

`methods.registry` lists the specs once. From them, `PeftConfig.from_dict` finds a method's config
class and `get_peft_model` its injector; `peftkit train` builds `--method` and the method flags;
`peftkit estimate` plans the method (or says it cannot); `peftkit doctor` runs its rules of thumb;
`peftkit compare`/`sweep` take its learning rate and seed settings.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

from ..config import TaskType
from ..train.ranges import csv_list

if TYPE_CHECKING:
    from torch import nn

    from ..config import PeftConfig
    from .base import Injector


# The `--target-modules` flag of the methods that wrap chosen linear layers.
TARGET_MODULES = dict(type=csv_list, default=None,
                      help="comma-separated module names, or all-linear (default: the method's "
                           "PEFT default for the model type, e.g. q_proj,v_proj for LoRA on Llama)")


@dataclasses.dataclass(frozen=True)
class Finding:
    """One `peftkit doctor` finding: a severity (error > warning > info), the reason and the fix."""

    severity: str
    check: str
    reason: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.severity}] {self.check}: {self.reason} Fix: {self.fix}"


@dataclasses.dataclass(frozen=True)
class PlannerSupport:
    """How `peftkit estimate` counts a method. Parameters are always exact: the planner injects the
    method into the model built on the meta device. `lora_sites(model)` lists the LoRA branches
    whose saved activations the plan adds (`lora.LoraSite`s); `uncounted` says in words what the
    memory plan leaves out."""

    lora_sites: Callable[["nn.Module"], list] | None = None
    uncounted: str = ""


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A training method as the CLI, planner, doctor and experiments see it.

    `flags` maps each option (snake_case; `--r`, `--lora-alpha` on the command line and the same
    key in a YAML config) to argparse keywords with a `default` and a `help`; numbers use the
    range-checked parsers of `train.ranges`. A flag shared by several methods has one type.
    `checks(config)` returns the doctor's findings on a dict of `peftkit train` option values
    (keys snake_case, values as given). `config_cls` None means no adapter: every weight trains.
    """

    name: str  # the `--method` value
    help: str  # a few words for `--help`
    config_cls: type["PeftConfig"] | None
    injector: "Injector | None"
    flags: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    checks: Callable[[dict], list[Finding]] | None = None
    planner: PlannerSupport | None = PlannerSupport()  # None: `estimate` refuses, saying why
    kbit_base: bool = False  # the frozen base is loaded in 4-bit (its `quant_type` flag)
    merges: bool = True  # its adapters fold into the base weights (`merge_and_unload`)
    shardable: bool = False  # `peftkit train --fsdp` trains it (tested in tests/test_fsdp.py)
    learning_rate: float = 2e-4  # compare/sweep's default for this method
    compare_flags: dict[str, Any] = dataclasses.field(default_factory=dict)  # the seed's settings

    def build_config(self, options: dict[str, Any]) -> "PeftConfig | None":
        """The method's config from `options`: those that are fields of `config_cls` (others, such
        as `quant_type`, configure the run, not the adapter); a None keeps the field's default.
        None for full fine-tuning."""
        if self.config_cls is None:
            return None
        fields = {f.name for f in dataclasses.fields(self.config_cls)}
        return self.config_cls(task_type=TaskType.CAUSAL_LM, **{
            k: v for k, v in options.items() if k in fields and v is not None})

    def load_kwargs(self, options: dict[str, Any], sharded: bool = False) -> dict[str, Any]:
        """`from_pretrained` keywords for the base model: 4-bit for a k-bit-base method (stored
        in the model dtype when `sharded`)."""
        if not self.kbit_base:
            return {}
        from ..quant import kbit_load_kwargs

        return kbit_load_kwargs(options["quant_type"], sharded=sharded)
