"""peftkit's speed layer: three parts that make a LoRA training step faster and leaner than the
stock computation while computing the same values. The model `get_peft_model` returns has all
three on, so a stock transformers `Trainer`, TRL's `SFTTrainer` and a hand-written loop get them;
`apply` switches each off or on again.

- `loss` (`fast/loss.py`): a training forward that asks only for the loss
  (`model(input_ids=..., labels=...)` in train mode with grad enabled) returns it from the fused,
  chunked output-head cross-entropy, never holding the (batch, length, vocab) logits; its
  `logits` are None there, as with Liger Kernel's fused linear cross-entropy. Evaluation,
  `prediction_step`, `generate` and any forward without labels return the logits.
- `mlp` (`fast/swiglu.py`): gated SiLU MLPs save gate(x) and up(x) and recompute silu in
  backward; values and gradients bitwise the stock ones.
- `lora_function` (`fast/lora_fn.py`): each LoRA branch through one autograd function that saves
  x, not the dropout's mask and dropped copy.

Each part is correct under autocast (its backward runs under the forward's autocast state) and
under gradient checkpointing from any source (the same forward runs when recomputed), runs on
CUDA with torch ops, and steps aside for modules with hooks (`hooks.bypassable`), so ZeRO-3,
FSDP2 and user hooks see the stock calls.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .swiglu import use_lean_mlps

__all__ = ["Speed", "apply", "use_lean_mlps"]


@dataclasses.dataclass
class Speed:
    """Which parts of the speed layer a `PeftModel` uses (its `speed` attribute)."""

    loss: bool = True
    mlp: bool = True
    lora_function: bool = True


def apply(model: nn.Module, *, loss: bool | None = None, mlp: bool | None = None,
          lora_function: bool | None = None) -> nn.Module:
    """Switch parts of the speed layer on a peftkit `PeftModel` (None: leave as is) and push the
    settings to its layers, also to those added since. Returns the model.

    `peftkit.fast.apply(model, loss=False, mlp=False, lora_function=False)` gives the stock
    computation (as `get_peft_model(..., speed=False)` does)."""
    speed = getattr(model, "speed", None)
    if not isinstance(speed, Speed):
        raise TypeError(f"peftkit.fast.apply takes a peftkit PeftModel, got {type(model).__name__}")
    changes = {"loss": loss, "mlp": mlp, "lora_function": lora_function}
    for name, value in changes.items():
        if value is not None:
            setattr(speed, name, bool(value))
    use_lean_mlps(model, speed.mlp)
    for module in model.modules():
        if hasattr(module, "use_lora_function"):
            module.use_lora_function = speed.lora_function
    return model
