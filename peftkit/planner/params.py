"""Exact parameter counts: build the model on the meta device and inject the method for real.

`with torch.device("meta")` makes every tensor shape-only, so a 70B model costs no memory and a
second or so. `get_peft_model` then injects the method exactly as training would (LoRA creates its
A/B matrices on the base weight's device, here meta), and `PeftModel.get_nb_trainable_parameters`
counts, so the numbers are the ones `print_trainable_parameters()` prints at training time.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import targets
from ..methods.spec import MethodSpec


@dataclasses.dataclass
class Tensor:
    """One parameter as the memory plan needs it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    trainable: bool
    quantized: bool  # stored in NF4 (the frozen linear weights of a k-bit-base method: QLoRA)

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclasses.dataclass
class Census:
    """Parameters of the adapted model, and the facts the memory plan reads from it."""

    trainable: int
    total: int
    tensors: list[Tensor]
    lora: list  # the LoRA branches whose activations the plan adds (`methods.lora.LoraSite`)
    peft_config: object | None  # None for full fine-tuning

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total


def census(model_config, spec: MethodSpec, peft_config, dtype: torch.dtype) -> Census:
    """Count the parameters of `model_config` adapted by `spec` / `peft_config` (see module doc)."""
    from transformers import AutoModelForCausalLM

    from ..model import get_peft_model

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    head = targets.output_head_path(model)
    quantizable = {
        id(m.weight) for n, m in targets.named_modules(model)
        if spec.kbit_base and isinstance(m, torch.nn.Linear) and n != head
    }
    if peft_config is None:
        trainable = total = sum(p.numel() for p in model.parameters())
    else:
        model = get_peft_model(model, peft_config)
        trainable, total = model.get_nb_trainable_parameters()
    tensors = [Tensor(n, tuple(p.shape), p.dtype, p.requires_grad, id(p) in quantizable)
               for n, p in model.named_parameters()]
    lora = spec.planner.lora_sites(model) if spec.planner.lora_sites else []
    return Census(trainable, total, tensors, lora, peft_config)
