"""`--method` dispatch: one table entry per training method.

An entry names the flags that apply to the method (argparse options, each with its default) and
builds the method's config from the parsed options (`None` = train every weight). A flag set for
a method it does not apply to is an error. `model_kwargs` and `prepare` let a method change how
the base model is loaded (e.g. 4-bit) and prepared before its adapters are injected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import PeftConfig, TaskType
from ..methods.lora import LoraConfig


def _csv(text: str) -> list[str] | str:
    """`q_proj,v_proj` -> a list; `all-linear` stays a string (PEFT's keyword)."""
    return text if text == "all-linear" else [t.strip() for t in text.split(",") if t.strip()]


LORA_FLAGS: dict[str, dict[str, Any]] = {
    "r": dict(type=int, default=8, help="LoRA rank"),
    "lora_alpha": dict(type=float, default=16.0, help="LoRA alpha (scaling = alpha / r)"),
    "lora_dropout": dict(type=float, default=0.05, help="dropout on the LoRA branch"),
    "target_modules": dict(type=_csv, default=None,
                           help="comma-separated module names, or all-linear (default: the "
                                "model type's PEFT default, q_proj,v_proj for Llama)"),
    "use_rslora": dict(action="store_true", default=False, help="rsLoRA scaling alpha/sqrt(r)"),
}


def _lora(opts: dict[str, Any]) -> PeftConfig:
    return LoraConfig(task_type=TaskType.CAUSAL_LM, **{k: opts[k] for k in LORA_FLAGS})


@dataclass(frozen=True)
class MethodSpec:
    flags: dict[str, dict[str, Any]]
    config: Callable[[dict[str, Any]], PeftConfig | None]
    model_kwargs: Callable[[dict[str, Any]], dict[str, Any]] = field(default=lambda opts: {})
    prepare: Callable[[Any], Any] | None = None  # base model -> base model, before injection


METHODS: dict[str, MethodSpec] = {
    "full": MethodSpec(flags={}, config=lambda opts: None),
    "lora": MethodSpec(flags=LORA_FLAGS, config=_lora),
}


def all_flags() -> dict[str, dict[str, Any]]:
    """Every method flag once (methods may share flags, e.g. LoRA's for QLoRA)."""
    out: dict[str, dict[str, Any]] = {}
    for spec in METHODS.values():
        out.update(spec.flags)
    return out


def resolve(method: str, opts: dict[str, Any]) -> tuple[MethodSpec, dict[str, Any]]:
    """The method's spec and its options with defaults filled in. `opts` holds every method flag,
    `None` where the user did not set it."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    spec = METHODS[method]
    for name, value in opts.items():
        if value is not None and name not in spec.flags:
            users = [m for m, s in METHODS.items() if name in s.flags]
            raise ValueError(f"--{name.replace('_', '-')} does not apply to --method {method} "
                             f"(it applies to: {', '.join(users)})")
    filled = {k: (opts.get(k) if opts.get(k) is not None else f["default"])
              for k, f in spec.flags.items()}
    return spec, filled
