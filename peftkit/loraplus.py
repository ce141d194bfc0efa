"""LoRA+ (Hayou et al., 2024, arXiv:2402.12354): B learns `loraplus_lr_ratio` times faster than A.

The paper shows that with equal learning rates the update of B (out, r) is too small in wide
models; it sets lr_B = ratio * lr_A (ratio ~ 16). The groups are Hugging Face PEFT's
(`peft.optimizers.create_loraplus_optimizer`), in its order:

    A        lora_A and the other matrices           lr,                   loraplus_weight_decay
    emb      parameters of a LoRA embedding layer    loraplus_lr_embedding (none in peftkit)
    B        lora_B, and every 1-D tensor (biases,   lr * ratio,           loraplus_weight_decay
             DoRA's magnitude) that takes decay
    B, 0     the same, without decay (biases,        lr * ratio,           0
             norms)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
from transformers.trainer_pt_utils import get_parameter_names


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *,
                              lr: float, loraplus_lr_ratio: float,
                              **kwargs: Any) -> torch.optim.Optimizer:
    """`optimizer_cls` over the trainable parameters of `model` in LoRA+'s four groups;
    `loraplus_weight_decay` (default 0) and `loraplus_lr_embedding` (default 1e-6) are read from
    `kwargs`, the rest goes to the optimizer."""
    decay = {n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n}
    groups: dict[str, list[nn.Parameter]] = {"A": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_B" in name or param.ndim == 1:
            groups["B" if name in decay else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    return optimizer_cls([
        {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
        {"params": [], "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ], **{**kwargs, "lr": lr})
