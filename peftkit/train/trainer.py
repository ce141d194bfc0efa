"""`peftkit train`'s Trainer: the stock one with peftkit's training step.

Checkpoints hold the adapter in PEFT's layout, as with any stock Trainer (`peftkit.hf_trainer`
teaches transformers that a peftkit `PeftModel` is a PEFT model); everything else a checkpoint
holds (optimizer, scheduler, RNG states, `trainer_state.json`) is the stock Trainer's.
`trainer_state.json` is the last file a checkpoint gets, so a checkpoint folder without a readable
one is an interrupted save and `last_complete_checkpoint` skips it.

With `fused_loss` (the default) a training step computes the loss with `loss.causal_lm_loss` (no
(B, T, V) logits) when `loss.fusable(model)` and the batch holds only input_ids, attention_mask,
position_ids and labels. It stands in for the model's forward during that step only, so the
stock `compute_loss`/`training_step` still decide everything around it: `num_items_in_batch`
(passed when the model accepts loss kwargs), the division for gradient accumulation, the
world-size factor of `average_tokens_across_devices`, DDP's gradient sync and accelerate's
autocast. Evaluation, label smoothing, a `compute_loss_func` and sequence or context parallelism
keep the stock loss from full logits.

Every training step's forward also runs the model's gated SiLU MLPs through `swiglu.SiluMul`
(bitwise the stock values and gradients, one (N, I) activation fewer saved per layer) and its
frozen fp32 CPU linears through oneDNN (`frozen_linear.FrozenLinear`; not under CPU autocast),
except under gradient checkpointing and `torch_compile`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Iterator

import torch
from torch import nn
from transformers import Trainer

from ..frozen_linear import frozen_linears
from ..loss import causal_lm_loss, fusable
from ..swiglu import lean_swiglu

FUSED_INPUTS = {"input_ids", "attention_mask", "position_ids", "labels"}


@contextlib.contextmanager
def training_forward(model: nn.Module) -> Iterator[None]:
    """The reroutings `peftkit train` applies to a training forward (module docstring): the lean
    SwiGLU and the oneDNN frozen linears. The benchmarks and tests enter it to run that step."""
    with lean_swiglu(model), frozen_linears(model):
        yield


class AdapterTrainer(Trainer):
    def __init__(self, *args, fused_loss: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fused_loss = fused_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        module = self.accelerator.unwrap_model(model)
        lean = model.training and torch.is_grad_enabled() and not self.args.torch_compile
        with training_forward(module) if lean else contextlib.nullcontext():
            if return_outputs or not self._fuses(model, module, inputs):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            with _loss_as_forward(module, self.accelerator.autocast):
                return super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)

    def _fuses(self, model: nn.Module, module: nn.Module, inputs: dict) -> bool:
        """`module`: the model unwrapped from DDP / accelerate."""
        parallel = getattr(self.accelerator, "parallelism_config", None)
        return (self.fused_loss and model.training and torch.is_grad_enabled()
                and "labels" in inputs and set(inputs) <= FUSED_INPUTS
                and self.label_smoother is None and self.compute_loss_func is None
                and not self.args.torch_compile
                and not (parallel is not None and (parallel.sp_enabled or parallel.cp_enabled))
                and fusable(module))


@contextlib.contextmanager
def _loss_as_forward(module: nn.Module, autocast):
    """While active, `module(**batch)` returns {"loss": causal_lm_loss(module, **batch)}, under
    `autocast()` (in place of accelerate's mixed-precision wrapper of `forward`, if any)."""
    saved = module.__dict__.get("forward")

    def forward(**batch):
        with autocast():
            return {"loss": causal_lm_loss(module, **batch)}

    module.forward = forward
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The highest-step `checkpoint-N` folder whose save finished, or None."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted((int(m.group(1)) for name in os.listdir(output_dir)
                    if (m := re.fullmatch(r"checkpoint-(\d+)", name))), reverse=True)
    folders = (os.path.join(output_dir, f"checkpoint-{step}") for step in steps)
    return next((folder for folder in folders if is_complete(folder)), None)


def is_complete(folder: str) -> bool:
    """True when the checkpoint's last file, `trainer_state.json`, was written in full."""
    try:
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as fh:
            json.load(fh)
    except (OSError, ValueError):
        return False
    return True
