"""Which modules a config targets, with Hugging Face PEFT's matching rules.

- a list matches a module whose full path equals an entry or ends with `"." + entry`;
- a string is a regular expression that must match the full path;
- `"all-linear"` is every linear layer except the model's output head;
- `layers_to_transform` keeps only blocks whose index (the first numbered path segment, or the
  one after `layers_pattern`) is listed; it applies to list targets only, as in PEFT.
"""

from __future__ import annotations

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from .methods.base import TunerLayer

ALL_LINEAR = "all-linear"


def linear_types() -> tuple[type, ...]:
    """Module types LoRA can wrap: nn.Linear, GPT-2's Conv1D and bitsandbytes' k-bit linears."""
    types: list[type] = [nn.Linear, Conv1D]
    try:
        import bitsandbytes as bnb

        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    except ImportError:
        pass
    return tuple(types)


def matches_list(path: str, entries) -> bool:
    return any(path == e or path.endswith("." + e) for e in entries)


def matches(path: str, spec: str | list[str] | None) -> bool:
    """PEFT's rule for `target_modules` / `exclude_modules` (see the module docstring)."""
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return matches_list(path, spec)


def layer_index(path: str, layers_pattern: str | list[str] | None) -> int | None:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        m = next(
            (m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", path))), None
        )
    return int(m.group("idx")) if m else None


def named_modules(model: nn.Module):
    """`(path, module)` pairs that see through adapter wrappers: a wrapped layer is listed once,
    under its own path, as its `base_layer`; nothing inside a wrapper is listed."""
    inside = None
    for path, module in model.named_modules():
        if inside is not None and path.startswith(inside):
            continue
        if isinstance(module, TunerLayer):
            inside = path + "."
            module = getattr(module, "base_layer", None)
            if module is None:
                continue
        yield path, module


def output_head_path(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def find_targets(model: nn.Module, config) -> list[str]:
    """Paths of the modules `config` targets; a target that matches nothing, or matches a module
    that is not a linear layer, raises ValueError naming the model's linear modules."""
    spec = config.target_modules
    modules = dict(named_modules(model))
    kinds = linear_types()
    linear = [n for n, m in modules.items() if isinstance(m, kinds)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
    if spec == ALL_LINEAR:
        head = output_head_path(model)
        chosen = [n for n in linear if n != head]
    else:
        chosen = [n for n in modules if n and matches(n, spec)]
    skip = getattr(config, "modules_to_save", None) or []
    chosen = [
        n
        for n in chosen
        if not matches(n, config.exclude_modules)
        and not any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", n) for m in skip)
    ]
    if config.layers_to_transform is not None and not isinstance(spec, str):
        wanted = config.layers_to_transform
        wanted = {wanted} if isinstance(wanted, int) else set(wanted)
        chosen = [n for n in chosen if layer_index(n, config.layers_pattern) in wanted]
    if not chosen:
        raise ValueError(
            f"target_modules={spec!r} matched no module of {type(model).__name__} (after "
            f"exclude_modules, modules_to_save and layers_to_transform). Its linear modules are "
            f"named {leaves}; full paths look like {linear[:3]}."
        )
    bad = [n for n in chosen if not isinstance(modules[n], kinds)]
    if bad:
        raise ValueError(
            f"target_modules matched {bad[:3]}, a {type(modules[bad[0]]).__name__}, not a linear "
            f"layer; target linear modules such as {leaves}"
        )
    return chosen


def model_default(model: nn.Module, table: dict, method: str, fix: str):
    """`table[model.config.model_type]`, a method's default targets; a clear error without one."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in table:
        raise ValueError(f"target_modules is not set and peftkit has no {method}default for "
                         f"model_type {model_type!r}; {fix}")
    return table[model_type]
