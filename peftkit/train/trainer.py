"""`peftkit train`'s Trainer: the stock one, training a model that brings peftkit's speed layer.

Checkpoints hold the adapter in PEFT's layout, as with any stock Trainer (`peftkit.hf_trainer`
teaches transformers that a peftkit `PeftModel` is a PEFT model); everything else a checkpoint
holds (optimizer, scheduler, RNG states, `trainer_state.json`) is the stock Trainer's.
Which `checkpoint-N` folders finished saving is `checkpoints`' business.

The training step is the stock one: the model brings peftkit's speed layer (`peftkit.fast`: the
fused output-head loss in a training forward that asks only for the loss, the lean gated MLPs, the
LoRA autograd function), so the stock `compute_loss`/`training_step` decide everything around it:
`num_items_in_batch`, the division for gradient accumulation, the world-size factor of
`average_tokens_across_devices`, DDP's gradient sync and accelerate's autocast. Label smoothing,
a `compute_loss_func` and sequence or context parallelism call the model without `labels` or with
more inputs, so they get the stock loss from full logits. `fused_loss=False` switches the fused
loss off. A model without adapters (full fine-tuning) gets the lean MLPs and, during training
steps, the fused loss through `_fused_loss_forward`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from torch import nn
from transformers import Trainer

from .. import fast
from ..fast import loss as fast_loss
from ..loraplus import create_loraplus_optimizer
from ..model import PeftModel


class AdapterTrainer(Trainer):
    """The stock Trainer with peftkit's speed layer; `loraplus_lr_ratio` trains with LoRA+'s
    parameter groups (`peftkit.loraplus`), --optim's optimizer and --weight-decay."""

    def __init__(self, *args, fused_loss: bool = True, loraplus_lr_ratio: float | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fused_loss = fused_loss
        self.loraplus_lr_ratio = loraplus_lr_ratio
        if isinstance(self.model, PeftModel):
            fast.apply(self.model, loss=fused_loss)
        else:
            fast.use_lean_mlps(self.model)

    def create_optimizer(self, model=None):
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        model = self.model if model is None else model
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = create_loraplus_optimizer(
            model, optimizer_cls, loraplus_lr_ratio=self.loraplus_lr_ratio,
            loraplus_weight_decay=self.args.weight_decay, **kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        module = self.accelerator.unwrap_model(model)
        if not self.fused_loss or isinstance(module, PeftModel):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with _fused_loss_forward(module, self.accelerator.autocast):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@contextlib.contextmanager
def _fused_loss_forward(module: nn.Module, autocast: Callable) -> Iterator[None]:
    """While active, a training forward of `module` that asks only for the loss
    (`fast.loss.training_forward_loss`) returns `fast.loss.fused_forward`'s output under
    `autocast()` (in place of accelerate's mixed-precision wrapper of `forward`, if any)."""
    saved = module.__dict__.get("forward")
    stock = module.forward

    def forward(*args, **kwargs):
        if fast_loss.training_forward_loss(module, args, kwargs):
            with autocast():
                return fast_loss.fused_forward(module, **kwargs)
        return stock(*args, **kwargs)

    module.forward = forward
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved
